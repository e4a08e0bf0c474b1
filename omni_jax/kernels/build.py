"""Compile a kernel source of this package with the machine's C++ compiler and register its XLA FFI targets.

A source is compiled once per (source and header texts, flags, jax version) into a per-user cache
(`OMNI_JAX_KERNEL_CACHE`, default ~/.cache/omni_jax/kernels; the write is an atomic rename) and loaded with
ctypes; each exported handler symbol is registered as a CPU FFI target. Kernels need Linux and AVX-512 or AVX2
with FMA (checked in /proc/cpuinfo): a source is compiled for the widest the CPU has (`cpu_isa`; simd.h holds
what differs), or for the one `OMNI_JAX_CPU_KERNEL_ISA` names ("avx2" on an AVX-512 machine tests that build).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
ISA_ENV = "OMNI_JAX_CPU_KERNEL_ISA"
# instruction set -> (the /proc/cpuinfo flags it needs, its compiler flags), widest first
ISAS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl"), ("-mavx512f", "-mavx512bw", "-mavx512vl")),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
}


def cpu_isa() -> str | None:
    """The instruction set the kernels are compiled for: the widest of `ISAS` the CPU has, or the one named by
    OMNI_JAX_CPU_KERNEL_ISA if the CPU has it; None where it has none (then everything runs through XLA)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    usable = [isa for isa, (features, _) in ISAS.items() if flags.issuperset(features)]
    wanted = os.environ.get(ISA_ENV)
    if wanted:
        return wanted if wanted in usable else None
    return usable[0] if usable else None


def cpu_has_features() -> bool:
    """Whether the kernels can be built for this CPU (`cpu_isa`)."""
    return cpu_isa() is not None


def cache_dir() -> Path:
    root = os.environ.get("OMNI_JAX_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "omni_jax", "kernels")
    return Path(root)


def compile_source(source: Path, isa: str | None = None) -> Path:
    """The shared library of `source` for instruction set `isa` (default `cpu_isa()`), compiled into the cache on
    first use. The key covers the source, the headers beside it (the kernels include them), the flags and the jax
    version."""
    flags = (*FLAGS, *ISAS[isa or cpu_isa()][1])
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join(flags).encode() + jax.__version__.encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)
    return target


def load(source: Path, targets: dict[str, str], switch: str) -> bool:
    """Build `source` and register {ffi target name: exported handler symbol}; False (logged) where it cannot be,
    or where the environment variable `switch` is "0"."""
    isa = cpu_isa()
    if os.environ.get(switch, "1") == "0" or not sys.platform.startswith("linux") or isa is None:
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(compile_source(source, isa)))
        for name, symbol in targets.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as error:
        log.warning("CPU kernel %s unavailable, using XLA: %s", source.name, error)
        return False
    return True


def multi_device_mesh() -> bool:
    """Whether a mesh of several devices is set (the SPMD partitioner cannot split a custom call)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1
