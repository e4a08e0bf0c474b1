"""HF Qwen2.5-Omni directory -> omni_jax checkpoint directory (`omni-jax convert HF_DIR OUT_DIR`).

OUT_DIR layout:
    config.json       the HF config.json, copied byte for byte (so it round trips)
    params/           Orbax checkpoint of the param tree (omni_jax.checkpoint)
    omni_jax.json     {"format_version", "dtype", "thinker_only", "source", ...}; written last, so its
                      presence means the conversion completed
    tokenizer / processor / generation files, copied when present

The checkpoint is converted leaf by leaf: each stacked leaf ([L, ...] over the layers) is assembled from the
per-layer safetensors tensors, written with Orbax partial saving and released, so host memory peaks at about
the largest stacked leaf (docs/convert.md has measurements).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Optional, Sequence


from omni_jax.checkpoint import PARAMS_SUBDIR, ParamsWriter
from omni_jax.config import OmniConfig
from omni_jax.hf_mapping import HFCheckpointReader
from omni_jax.voices import SPK_DICT, VOICES_INDEX, VOICES_TENSORS, read_spk_dict, write_voices
from omni_jax.weights.safetensors_io import dtype_from_name

log = logging.getLogger("omni_jax.convert")

FORMAT_VERSION = 1
METADATA_FILE = "omni_jax.json"
# Copied verbatim in both directions when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def convert(hf_dir: str, out_dir: str, dtype=None, thinker_only: bool = False, *, compress: bool = False,
            chunk_bytes: Optional[int] = None, overwrite: bool = False) -> dict:
    """Convert an HF checkpoint directory into an omni_jax checkpoint directory; returns the metadata written
    to omni_jax.json.

    dtype: cast every weight (e.g. "bfloat16"); None keeps the stored dtypes.
    thinker_only: convert the thinker only and skip talker.* / token2wav.* tensors and spk_dict.pt on purpose
      (this build has no talker / token2wav modules yet; without the flag such tensors are an error).
    compress: zstd-compress the Orbax arrays (smaller, slower, one extra leaf-sized buffer while writing).
    chunk_bytes: store leaves in chunks of at most this size, split along the layers axis (default: one chunk
      per leaf, the lowest conversion peak; chunks lower the peak of every later restore; docs/convert.md).
    overwrite: replace an existing conversion in out_dir.
    Raises CheckpointMismatchError (before anything is written) listing every missing, unexpected and
    mis-shaped tensor.
    """
    t0 = time.time()
    hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
    config_file = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected an HF Qwen2.5-Omni model directory)")
    with open(config_file) as f:
        config = OmniConfig.from_hf_config(json.load(f))
    out_dtype = dtype_from_name(dtype) if dtype is not None else None

    reader = HFCheckpointReader(hf_dir, config, thinker_only=thinker_only)  # validates everything first
    if reader.skipped or reader.skipped_files:
        log.warning("thinker_only: skipping %d talker/token2wav tensors%s on purpose", len(reader.skipped),
                    f" and {', '.join(reader.skipped_files)}" if reader.skipped_files else "")

    os.makedirs(out_dir, exist_ok=True)
    meta_file = os.path.join(out_dir, METADATA_FILE)
    if os.path.exists(meta_file):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a converted checkpoint (pass overwrite=True)")
        os.remove(meta_file)  # the directory is incomplete from here until the end

    stored = set()
    total_bytes = 0
    with ParamsWriter(os.path.join(out_dir, PARAMS_SUBDIR), compress=compress, chunk_bytes=chunk_bytes,
                      overwrite=overwrite) as writer:
        for path, array in reader.iter_leaves(out_dtype):
            log.info("%s %s %s", "/".join(path), array.dtype, list(array.shape))
            writer.write(path, array)
            stored.add(array.dtype.name)
            total_bytes += array.nbytes
            del array

    shutil.copyfile(config_file, os.path.join(out_dir, "config.json"))
    copied = copy_side_files(hf_dir, out_dir)
    if not thinker_only and os.path.isfile(os.path.join(hf_dir, SPK_DICT)):
        # Voices become torch-free speakers.safetensors + speakers.json (reading the .pt needs torch once, here).
        write_voices(out_dir, read_spk_dict(os.path.join(hf_dir, SPK_DICT)))
        copied.append(f"{SPK_DICT} -> {VOICES_TENSORS}, {VOICES_INDEX}")
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": out_dtype.name if out_dtype is not None else (stored.pop() if len(stored) == 1 else sorted(stored)),
        "thinker_only": bool(thinker_only or config.hf_root == "thinker"),
        "hf_layout": "thinker" if config.hf_root == "thinker" else "omni",
        "source": hf_dir,
        "storage": {"compress": bool(compress), "chunk_bytes": chunk_bytes},
        "num_leaves": len(reader.leaves),
        "param_bytes": int(total_bytes),
        "skipped_tensors": len(reader.skipped),
        "skipped_files": reader.skipped_files,
        "copied_files": copied,
    }
    with open(meta_file + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(meta_file + ".tmp", meta_file)
    log.info("converted %s -> %s (%.2f GB, %.1f s)", hf_dir, out_dir, total_bytes / 1e9, time.time() - t0)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-jax convert", description=__doc__.split("\n")[0])
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16 (default: keep)")
    p.add_argument("--thinker-only", action="store_true",
                   help="convert the thinker only; skip talker/token2wav tensors and spk_dict.pt on purpose")
    p.add_argument("--compress", action="store_true", help="zstd-compress the Orbax arrays")
    p.add_argument("--overwrite", action="store_true", help="replace an existing conversion in OUT_DIR")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    meta = convert(args.hf_dir, args.out_dir, dtype=args.dtype, thinker_only=args.thinker_only,
                   compress=args.compress, overwrite=args.overwrite)
    print(f"converted {args.hf_dir} -> {args.out_dir}: {meta['num_leaves']} leaves, "
          f"{meta['param_bytes'] / 1e9:.2f} GB, dtype {meta['dtype']}"
          + (f"; skipped {meta['skipped_tensors']} talker/token2wav tensors"
             + (f" and {', '.join(meta['skipped_files'])}" if meta["skipped_files"] else "")
             if meta["skipped_tensors"] or meta["skipped_files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
