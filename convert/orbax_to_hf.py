"""omni_jax checkpoint directory -> HF directory that transformers loads (`omni-jax export CKPT_DIR OUT_DIR`).

Writes `model-0000k-of-0000n.safetensors` shards (at most `max_shard_bytes` each, one tensor may exceed it on
its own) + `model.safetensors.index.json` + config.json + the tokenizer / processor / generation files. Leaves
are restored one at a time and their HF tensors streamed into the shards in order, so host memory peaks at
about one restored leaf plus Orbax's read buffer for it.

Names are the on-disk legacy names. A checkpoint holding only the thinker is exported as a thinker-only HF
model (config.json = the thinker config, names without `thinker.`), which
`transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained` loads.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from omni_jax.checkpoint import iter_params, params_metadata, resolve_params_dir
from omni_jax.config import OmniConfig
from omni_jax.voices import SPK_DICT, read_voices, write_spk_dict
from omni_jax.hf_mapping import OPTIONAL_SECTIONS, export_plan, leaf_to_hf
from omni_jax.tree_utils import flatten_params
from omni_jax.weights.safetensors_io import SafetensorsWriter, dtype_from_name

from convert.hf_to_orbax import METADATA_FILE, copy_side_files

log = logging.getLogger("omni_jax.convert")

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 10**9
_HF_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def _export_config(config_dict: dict, thinker_root: bool, dtype_name: Optional[str]) -> dict:
    """The config.json to write: verbatim, or the thinker sub-config for a thinker-only export."""
    out = dict(config_dict)
    if thinker_root and config_dict.get("model_type") != "qwen2_5_omni_thinker":
        out = dict(config_dict["thinker_config"])
        out["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
        out.setdefault("model_type", "qwen2_5_omni_thinker")
        for key in ("dtype", "torch_dtype", "transformers_version"):
            if key in config_dict and key not in out:
                out[key] = config_dict[key]
    if dtype_name is not None:
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype_name
        out["dtype"] = dtype_name
    return out


def export(ckpt_dir: str, out_dir: str, dtype=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           overwrite: bool = False) -> dict:
    """Export an omni_jax checkpoint directory (config.json + params/) as an HF directory; returns the index.

    dtype: cast every weight (e.g. "bfloat16"); None keeps the stored dtypes (config.json's dtype is updated
    when given). Raises CheckpointMismatchError if the params do not match config.json.
    """
    t0 = time.time()
    ckpt_dir, out_dir = os.path.abspath(ckpt_dir), os.path.abspath(out_dir)
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        config_dict = json.load(f)
    config = OmniConfig.from_hf_config(config_dict)
    params_dir = resolve_params_dir(ckpt_dir)
    out_dtype = dtype_from_name(dtype) if dtype is not None else None

    # ---- plan: validate the leaves against the config, list every HF tensor and its shard
    shapes = flatten_params(params_metadata(params_dir))
    thinker_only = not any(path[0] in OPTIONAL_SECTIONS for path in shapes)
    thinker_root = thinker_only or config.hf_root == "thinker"
    plan = export_plan(config, {p: s.shape for p, s in shapes.items()}, thinker_only=thinker_only,
                       thinker_root=thinker_root, source=f"checkpoint {params_dir}")
    specs = []  # (name, dtype, shape) in write order
    for leaf in plan:
        dt = out_dtype if out_dtype is not None else np.dtype(shapes[leaf.rule.path].dtype)
        specs += [(name, dt, tuple(leaf.rule.hf_shape)) for name in leaf.names]
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[2], dtype=np.int64)) * np.dtype(spec[1]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    n = len(shards)
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    # ---- output directory
    os.makedirs(out_dir, exist_ok=True)
    stale = [f for f in os.listdir(out_dir) if f.endswith(".safetensors") or f == INDEX_FILE]
    if stale:
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds safetensors files ({stale[:3]}...); "
                                  "pass overwrite=True to replace them")
        for f in stale:
            os.remove(os.path.join(out_dir, f))

    # ---- stream: restore one leaf, write its tensors, move on
    weight_map, total = {}, 0
    shard_idx, written_in_shard = 0, 0
    writer = SafetensorsWriter(os.path.join(out_dir, files[0]), shards[0])
    try:
        # (not zip(plan, iter_params(...)): zip recycles its result tuple, which would keep the previous leaf
        # alive while the next one is being restored)
        by_path = {leaf.rule.path: leaf for leaf in plan}
        for path, value in iter_params(params_dir, keys=list(by_path)):
            leaf = by_path[path]
            for name, tensor in leaf_to_hf(leaf, value, out_dtype):
                writer.write(name, tensor)
                weight_map[name] = files[shard_idx]
                total += tensor.nbytes
                written_in_shard += 1
                if written_in_shard == len(shards[shard_idx]):
                    writer.close()
                    log.info("wrote %s", files[shard_idx])
                    shard_idx, written_in_shard = shard_idx + 1, 0
                    if shard_idx < n:
                        writer = SafetensorsWriter(os.path.join(out_dir, files[shard_idx]), shards[shard_idx])
            del value
    except BaseException:
        writer.abort()
        raise

    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_export_config(config_dict, thinker_root,
                                 _HF_DTYPE_NAMES.get(out_dtype.name) if out_dtype is not None else None),
                  f, indent=2, sort_keys=True)
        f.write("\n")
    copy_side_files(ckpt_dir, out_dir)
    if not thinker_root:  # the full class needs spk_dict.pt next to the weights
        voices = read_voices(ckpt_dir)
        if voices:
            write_spk_dict(os.path.join(out_dir, SPK_DICT), voices)
    if os.path.exists(os.path.join(ckpt_dir, METADATA_FILE)):
        with open(os.path.join(ckpt_dir, METADATA_FILE)) as f:
            log.info("source checkpoint: %s", json.load(f))
    log.info("exported %s -> %s: %d tensors, %d shards, %.2f GB, %.1f s", ckpt_dir, out_dir, len(weight_map), n,
             total / 1e9, time.time() - t0)
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-jax export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16 (default: keep)")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9)
    p.add_argument("--overwrite", action="store_true", help="replace safetensors files already in OUT_DIR")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    index = export(args.ckpt_dir, args.out_dir, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1e9),
                   overwrite=args.overwrite)
    files = sorted(set(index["weight_map"].values()))
    print(f"exported {args.ckpt_dir} -> {args.out_dir}: {len(index['weight_map'])} tensors in {len(files)} "
          f"shards, {index['metadata']['total_size'] / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
