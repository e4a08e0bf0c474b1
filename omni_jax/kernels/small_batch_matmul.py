"""A CPU kernel for projections of a few rows (decode steps): y[M, N] = x[M, K] . w[N, K]^T, M <= 8, f32 accumulation.

The weight comes in the decode layout ([out..., in...], `omni_jax.models.decode_layout`), so that each output is
the dot product of two contiguous rows. XLA:CPU runs decode-step projections well below this machine's memory
bandwidth: bfloat16 weights are read at 9-19 GB/s (PyTorch's oneDNN: ~40), and float32 products of 2-8 rows at
~30 GB/s. `small_batch_matmul.cc` streams each weight element once and accumulates in float32, split over XLA's
intra-op thread pool. It is compiled for AVX-512 where the CPU has it, else for AVX2 with FMA (`build.cpu_isa`).
bfloat16 runs on AVX512_BF16's pairwise dot product where the CPU has it (checked at run time; bfloat16 denormals
then count as zero), else it is widened in registers (docs/performance.md has the measurements).

The kernel is compiled with the machine's C++ compiler on first use (about 2 s) into a per-user cache and
registered as an XLA FFI target. It is used only where it applies (`use_kernel`): a CPU program
(`omni_jax.kernels.target.cpu_paths`), no multi-device mesh, x and w of one dtype (float32 or bfloat16), a
canonical equation, and 1-8 rows. `OMNI_JAX_CPU_MATMUL_KERNEL=0` turns it off; without a compiler or AVX2
everything runs through `jnp.einsum`.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from omni_jax.kernels import build, target

_SOURCE = Path(__file__).with_name("small_batch_matmul.cc")
_TARGET = "omni_jax_small_batch_matmul"
MAX_ROWS = 8
ENV_SWITCH = "OMNI_JAX_CPU_MATMUL_KERNEL"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernel is built and registered (compiles it on the first call)."""
    return build.load(_SOURCE, {_TARGET: "OmniJaxSmallBatchMatmul"}, ENV_SWITCH)


@jax.custom_vjp
def matmul(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """x [M, K] . w_t [N, K]^T -> [M, N] float32; x and w_t both float32 or both bfloat16, 1 <= M <= 8."""
    if not available():
        raise RuntimeError(f"the CPU small-batch matmul kernel is not available here (or {ENV_SWITCH}=0)")
    return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], w_t.shape[0]), jnp.float32),
                            vmap_method="sequential")(x, w_t)


def _matmul_fwd(x, w_t):
    return matmul(x, w_t), (x, w_t)


def _matmul_bwd(residuals, g):  # gradients as XLA's product would give them (not a hot path)
    _, pullback = jax.vjp(lambda a, b: jnp.einsum("mk,nk->mn", a, b, preferred_element_type=jnp.float32),
                          *residuals)
    return pullback(g)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def canonical_split(equation: str) -> Optional[tuple[int, int]]:
    """For "<rows><contracted>,<contracted><cols>-><rows><cols>" the lengths (len(rows), len(contracted))."""
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    contracted = [letter for letter in lhs if letter in rhs]
    n_rows = len(lhs) - len(contracted)
    if not contracted or lhs[n_rows:] != "".join(contracted) or rhs[:len(contracted)] != lhs[n_rows:]:
        return None
    if out != lhs[:n_rows] + rhs[len(contracted):] or len(set(lhs + rhs)) != len(lhs) + len(rhs) - len(contracted):
        return None
    return n_rows, len(contracted)


def decode_layout_equation(equation: str) -> Optional[str]:
    """The equation with the weight in the decode layout (its contracted dims moved last), e.g. "btnh,nhd->btd"
    -> "btnh,dnh->btd"; None where the equation is not canonical (such weights keep their layout)."""
    split = canonical_split(equation)
    if split is None:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    return f"{lhs},{rhs[split[1]:]}{rhs[:split[1]]}->{out}"


def use_kernel(equation: str, x: jax.Array, w_t: jax.Array, platform: str = "auto") -> bool:
    """Whether `einsum(equation, x, w_t)` (w_t in the decode layout) in a program for `platform` should run on the
    kernel (module docstring)."""
    if x.dtype != w_t.dtype or x.dtype not in (jnp.float32, jnp.bfloat16) or not target.cpu_paths(platform):
        return False
    split = canonical_split(equation)
    if split is None:
        return False
    rows = math.prod(x.shape[:split[0]])
    if not 1 <= rows <= MAX_ROWS or build.multi_device_mesh():
        return False
    return available()


def matrix_operands(equation: str, x: jax.Array, w_t: jax.Array) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """For a canonical equation and w_t in the decode layout: x as [M, K], w_t as [N, K] (reshapes of contiguous
    arrays, free) and the shape x2 . w2^T [M, N] reshapes back to."""
    n_rows, n_contracted = canonical_split(equation)
    rows_shape = x.shape[:n_rows]
    k = math.prod(x.shape[n_rows:])
    cols_shape = w_t.shape[:w_t.ndim - n_contracted]
    return (x.reshape(math.prod(rows_shape), k), w_t.reshape(math.prod(cols_shape), k),
            (*rows_shape, *cols_shape))


def einsum(equation: str, x: jax.Array, w_t: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, w, preferred_element_type=float32)` on the kernel, for w_t = w in the decode layout
    (`decode_layout_equation`); `use_kernel` must hold."""
    x2, w2, out_shape = matrix_operands(equation, x, w_t)
    return matmul(x2, w2).reshape(out_shape)
