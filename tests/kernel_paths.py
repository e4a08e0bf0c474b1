"""The CPU kernels' paths a machine would not take by itself, run in a fresh process (shared by the kernel tests).

The kernels read their switches once (kernels/build.py picks the instruction set, bf16_dot.h the bf16 path), so a
forced path needs its own process. On a CPU without AVX-512 both are the path the other tests take already."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SKIP_WITHOUT_KERNELS = "CPU without AVX-512 or AVX2 with FMA: the kernels are not built there and the model runs on XLA"

# (environment variable, value, the dtypes the check runs, the instruction set the process must report or None)
FORCED_PATHS = pytest.mark.parametrize("variable,value,dtypes,isa", [
    # bfloat16 for CPUs without AVX512_BF16: widened to float32 in registers
    ("OMNI_JAX_CPU_BF16_WIDEN", "1", "[jnp.bfloat16]", None),
    # the kernels compiled for AVX2 with FMA (8 lanes, 16 registers: other tile shapes), as on CPUs without AVX-512
    ("OMNI_JAX_CPU_KERNEL_ISA", "avx2", "[jnp.float32, jnp.bfloat16]", "avx2")])


def run_forced(script: str, variable: str, value: str, dtypes: str, isa: str | None) -> str:
    """Runs `script` (formatted with {tests} and {dtypes}; it prints "isa <cpu_isa()>") with variable=value in a
    fresh process; asserts it succeeded on the expected instruction set; returns its stdout."""
    env = dict(os.environ, **{variable: value})
    code = script.format(tests=os.path.dirname(__file__), dtypes=dtypes)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if isa is not None:
        assert f"isa {isa}" in result.stdout
    return result.stdout
