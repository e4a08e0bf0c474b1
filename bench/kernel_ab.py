"""A/B of variants of the small-batch matmul kernel in one process, timed fairly, in GB/s of weight read.

    python bench/kernel_ab.py                                  # the package's kernel alone: rates per shape
    python bench/kernel_ab.py variant.cc                       # the package's kernel against variant.cc
    python bench/kernel_ab.py a.cc a.cc --rows 1               # a control: the same source twice reads ~1.00

Each source is a full `small_batch_matmul.cc` (it may include the package's headers) compiled like the package's
(`omni_jax.kernels.build`, for the instruction set `build.cpu_isa()` picks) and registered under its own FFI
name. Timing is fair between variants:
- Each call reads a weight copy that was not read in the calls just before it. The copies of a shape together hold
  at least 4x the last-level cache, so every call streams its weight from DRAM. (Timing the variants one after
  another on one copy gives the later ones a partly cached weight: the same kernel measured 21.7 -> 27.5 GB/s by
  its position alone on the 32 MB-L3 Zen 3 machine.)
- The variants' order rotates every round, and each figure is the median over the rounds.
Every variant's output is checked against the first's. The machine's memory rate drifts within minutes, so
compare variants within one run, not across runs.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.kernels import build

KERNEL_DIR = Path(build.__file__).parent
PACKAGE_SOURCE = KERNEL_DIR / "small_batch_matmul.cc"
# talker decode projections (N x K): gate/up, down, q (and o), k/v
SHAPES = ((18944, 896), (896, 18944), (1536, 896), (512, 896))


def last_level_cache_bytes() -> int:
    """The largest cache sysfs lists for cpu0 (32 MiB if it lists none)."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def register(sources: list[Path]) -> list:
    """One jitted call per source: each built by `build.load` beside a copy of the package's headers, under its own
    FFI target name."""
    calls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, source in enumerate(sources):
            folder = Path(tmp) / f"variant{i}"
            folder.mkdir()
            for header in KERNEL_DIR.glob("*.h"):
                shutil.copy(header, folder)
            copy = folder / "small_batch_matmul.cc"
            shutil.copy(source, copy)
            name = f"omni_jax_kernel_ab_{i}"
            if not build.load(copy, {name: "OmniJaxSmallBatchMatmul"}, "OMNI_JAX_CPU_MATMUL_KERNEL"):
                raise SystemExit(f"{source}: could not be built (see the warning above)")
            calls.append(jax.jit(lambda x, w, name=name: jax.ffi.ffi_call(
                name, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(x, w)))
    return calls


def measure(calls: list, n: int, k: int, rows: int, dtype, rounds: int) -> list[float]:
    """Median GB/s of weight read per variant for x [rows, k] . w [n, k]^T."""
    rng = np.random.default_rng(0)
    weight_bytes = n * k * jnp.dtype(dtype).itemsize
    copies = max(3, math.ceil(4 * last_level_cache_bytes() / weight_bytes))
    weights = [jnp.asarray(rng.standard_normal((n, k), np.float32) * 0.02, dtype) for _ in range(copies)]
    x = jnp.asarray(rng.standard_normal((rows, k), np.float32), dtype)
    reference = np.asarray(calls[0](x, weights[0]))
    for i, call in enumerate(calls[1:], 1):
        np.testing.assert_allclose(np.asarray(call(x, weights[0])), reference, rtol=1e-4, atol=1e-4,
                                   err_msg=f"variant {i} differs from variant 0 at {n}x{k}, {rows} rows")
    seconds = [[] for _ in calls]
    ring = 0
    for round_ in range(rounds):
        for j in range(len(calls)):
            i = (j + round_) % len(calls)
            weight = weights[ring % copies]
            ring += 1
            start = time.perf_counter()
            calls[i](x, weight).block_until_ready()
            seconds[i].append(time.perf_counter() - start)
    return [weight_bytes / statistics.median(s) / 1e9 for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", type=Path,
                        help="variants to compare against the package's kernel (the first column)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rows", default="1,8", help="comma-separated row counts (1-8)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    isa = build.cpu_isa()  # OMNI_JAX_CPU_KERNEL_ISA=avx2 measures the AVX2 build on an AVX-512 machine
    if isa is None:
        raise SystemExit("this CPU has none of the kernels' instruction sets (AVX-512, AVX2 with FMA)")
    sources = [PACKAGE_SOURCE, *args.sources]
    calls = register(sources)
    print(f"{isa} build, {args.dtype}, last-level cache {last_level_cache_bytes() >> 20} MiB, medians of "
          f"{args.rounds} rounds; GB/s of weight (ratio to the first)")
    print("variants: " + ", ".join(f"[{i}] {s}" for i, s in enumerate(sources)))
    results = []
    for n, k in SHAPES:
        for rows in (int(r) for r in args.rows.split(",")):
            rates = measure(calls, n, k, rows, jnp.dtype(args.dtype), args.rounds)
            results.append({"n": n, "k": k, "rows": rows, "gb_per_s": rates})
            print(f"{n:6d} x {k:5d}, {rows} rows: " + "  ".join(
                f"{r:6.1f}" + (f" ({r / rates[0]:.2f})" if i else "") for i, r in enumerate(rates)), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"isa": isa, "dtype": args.dtype, "rounds": args.rounds,
                                         "sources": [str(s) for s in sources], "results": results}, indent=1))


if __name__ == "__main__":
    main()
