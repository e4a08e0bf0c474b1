"""Host memory and time of `convert` (HF safetensors -> Orbax) and `export` (Orbax -> HF safetensors).

Writes a random bf16 HF-layout checkpoint with the Qwen2.5-Omni-3B thinker's shapes (configs/models/
qwen2_5_omni_3b.yaml: LM 2048 hidden / 36 layers / 16 heads / 2 kv / head_dim 128 / ffn 11008 / vocab 151936,
audio and vision towers at the released sizes: 4.70 B params, 9.41 GB in bf16), sharded like a release
(model-0000k-of-0000n.safetensors + index, tensors in name order), then runs in fresh subprocesses:
  1. baseline: python + the imports convert needs (jax, orbax, omni_jax), nothing else;
  2. convert (bf16 kept) -> omni_jax checkpoint dir;
  3. export of that checkpoint -> HF safetensors;
  4. load_params of the checkpoint as numpy (the whole model in host memory, for reference);
and reports each one's peak RSS (psutil polling every 10 ms, cross-checked with the child's own getrusage
ru_maxrss), wall time and sizes. Every exported tensor is compared bitwise with the original (--no-verify
skips it). --variants chunked_64MB measures the other Orbax storage layout (`convert(..., chunk_bytes=64e6)`:
64 MB chunks along the layers axis) against the default (one chunk per leaf).

    python bench/convert_memory.py [--workdir DIR] [--keep] [--json out.json]
    python bench/convert_memory.py --variants one_chunk_per_leaf,chunked_64MB
    python bench/convert_memory.py --preset configs/models/qwen2_5_omni_7b.yaml --steps convert,export

Disk: ~3x the checkpoint (HF source, Orbax, export), removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni_jax.config import OmniConfig  # noqa: E402
from omni_jax.hf_mapping import output_name, rules_for  # noqa: E402
from omni_jax.weights.safetensors_io import SafetensorsWriter, index_hf_dir, read_tensor  # noqa: E402

GB = 1e9
SHARD_BYTES = 4 * 10**9


def make_random_checkpoint(out_dir: str, preset: str, seed: int = 0) -> dict:
    """A thinker-only HF directory (config.json + bf16 safetensors shards + index) with random weights."""
    import ml_dtypes

    config = OmniConfig.from_yaml(preset)
    os.makedirs(out_dir, exist_ok=True)
    hf_config = config.to_hf_config(thinker_only=True)
    hf_config["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    hf_config["dtype"] = "bfloat16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    specs = []
    for rule in rules_for(config, thinker_only=True):
        specs += [(output_name(n, thinker_root=True), tuple(rule.hf_shape)) for n in rule.hf_names()]
    specs.sort()
    shards, size = [[]], 0
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(out_dir, fname), [(n, ml_dtypes.bfloat16, s) for n, s in shard]) as w:
            for name, shape in shard:
                x = rng.standard_normal(shape, dtype=np.float32)
                x *= 0.02
                w.write(name, x.astype(ml_dtypes.bfloat16))
                weight_map[name] = fname
                total += x.size * 2
                del x
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return {"tensors": len(specs), "shards": len(shards), "param_bytes": total,
            "params": total // 2}


def measure(code: str, label: str) -> dict:
    """Run `code` in a fresh python; peak RSS by polling it every 10 ms and by its own ru_maxrss at exit."""
    import psutil

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    fd, maxrss_file = tempfile.mkstemp(suffix=".maxrss")
    os.close(fd)
    code += ("\nimport resource\nopen(%r, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))"
             % maxrss_file)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.01)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed with exit code {proc.returncode}")
    with open(maxrss_file) as f:
        maxrss = int(f.read()) * 1024  # KiB on Linux
    os.remove(maxrss_file)
    result = {"label": label, "wall_s": round(wall, 1), "peak_rss_gb": round(peak / GB, 3),
              "ru_maxrss_gb": round(maxrss / GB, 3)}
    print(json.dumps(result), flush=True)
    return result


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def verify(src: str, exported: str) -> int:
    a, b = index_hf_dir(src), index_hf_dir(exported)
    assert sorted(a) == sorted(b), "tensor names differ"
    for name in a:
        x, y = read_tensor(a[name]), read_tensor(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint16), y.view(np.uint16)), name
    return len(a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=os.path.join(ROOT, "configs", "models", "qwen2_5_omni_3b.yaml"))
    p.add_argument("--workdir", default=None, help="default: a new directory under $TMPDIR")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--variants", default="one_chunk_per_leaf",
                   help="Orbax storage layouts to measure, comma-separated: one_chunk_per_leaf (the default "
                        "layout), chunked_64MB")
    p.add_argument("--steps", default="convert,export,load",
                   help="subset of convert,export,load (load_params of the whole model as numpy needs host "
                        "memory for all of it: leave it out for the 7B on a 24 GiB host)")
    p.add_argument("--hf-dir", default=None, help="reuse a checkpoint made by an earlier run (--keep)")
    p.add_argument("--make-only", default=None, metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_only:
        print(json.dumps(make_random_checkpoint(args.make_only, args.preset)))
        return 0

    work = args.workdir or tempfile.mkdtemp(prefix="omni_jax_convert_bench_")
    hf, ckpt, exported = (os.path.join(work, d) for d in ("hf", "ckpt", "exported"))
    results: dict = {"preset": os.path.relpath(args.preset, ROOT)}
    try:
        # in a subprocess, so this process stays small (a child's ru_maxrss includes the parent's RSS it
        # was forked from, before exec)
        t0 = time.time()
        if args.hf_dir:
            hf = args.hf_dir
            info = json.dumps({"tensors": len(index_hf_dir(hf)), "param_bytes": dir_bytes(hf), "reused": hf})
        else:
            info = subprocess.run([sys.executable, os.path.abspath(__file__), "--make-only", hf, "--preset",
                                   args.preset], check=True, capture_output=True, text=True).stdout
        results["checkpoint"] = json.loads(info.strip().splitlines()[-1])
        results["checkpoint"]["make_s"] = round(time.time() - t0, 1)
        results["checkpoint"]["hf_dir_bytes"] = dir_bytes(hf)
        print(json.dumps(results["checkpoint"]), flush=True)

        results["baseline"] = measure(
            "import jax, numpy; from orbax.checkpoint import v1; import omni_jax.checkpoint, omni_jax.hf_mapping; "
            "import convert.hf_to_orbax, convert.orbax_to_hf", "baseline imports")
        variants = {"one_chunk_per_leaf": None, "chunked_64MB": 64 * 10**6}
        for variant in args.variants.split(","):
            chunk = variants[variant]
            r = results[variant] = {}
            r["convert"] = measure(f"from convert.hf_to_orbax import convert; "
                                   f"convert({hf!r}, {ckpt!r}, chunk_bytes={chunk!r})", f"convert [{variant}]")
            r["convert"]["orbax_dir_bytes"] = dir_bytes(os.path.join(ckpt, "params"))
            steps = args.steps.split(",")
            if "export" in steps:
                r["export"] = measure(f"from convert.orbax_to_hf import export; export({ckpt!r}, {exported!r})",
                                      f"export [{variant}]")
                r["export"]["hf_dir_bytes"] = dir_bytes(exported)
            if "load" in steps:
                r["load_params_numpy"] = measure(f"from omni_jax.checkpoint import load_params; "
                                                 f"p = load_params({ckpt!r})", f"load_params (numpy) [{variant}]")
            if "export" in steps and not args.no_verify:
                t0 = time.time()
                r["verified_tensors"] = verify(hf, exported)
                r["verify_s"] = round(time.time() - t0, 1)
            if variant != args.variants.split(",")[-1]:
                shutil.rmtree(ckpt)
                shutil.rmtree(exported, ignore_errors=True)
        from omni_jax.checkpoint import params_metadata
        from omni_jax.tree_utils import flatten_params

        leaves = flatten_params(params_metadata(ckpt))
        largest = max(leaves.items(), key=lambda kv: np.prod(kv[1].shape) * kv[1].dtype.itemsize)
        results["largest_leaf"] = {"path": "/".join(largest[0]), "shape": list(largest[1].shape),
                                   "bytes": int(np.prod(largest[1].shape)) * largest[1].dtype.itemsize}
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
