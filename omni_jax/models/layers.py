"""Shared Flax layers: einsum projections, RMSNorm, embeddings; all params carry logical axis names."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.kernels import small_batch_matmul, target

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def dtype_of(name_or_dtype) -> jnp.dtype:
    """'bfloat16' / jnp.bfloat16 / np.dtype -> jnp.dtype."""
    return jnp.dtype(name_or_dtype)


class Einsum(nn.Module):
    """A projection written as one einsum with named dims, e.g. "btd,dnh->btnh".

    `kernel_shape` and `kernel_axes` describe the weight (logical axis names for sharding); `bias_shape` /
    `bias_axes` the optional bias added to the output's trailing dims. The dot runs in `dtype` and accumulates
    in float32 (`preferred_element_type`), which is both exact enough and fast on CPU/TPU.

    The weight is the param "kernel" ([in..., out...] as `kernel_shape`), or "kernel_t" where the params were
    converted to the decode layout ([out..., in...], `omni_jax.models.decode_layout`): products of a few rows on
    the CPU (decode steps) then run on `omni_jax.kernels.small_batch_matmul`.

    `platform` is the target (`omni_jax.kernels.target`); the CPU kernel and the bfloat16 second-row padding
    (`_needs_second_row`) are taken only in a CPU program.
    """

    equation: str
    kernel_shape: Sequence[int]
    kernel_axes: Sequence[str | None]
    bias_shape: Sequence[int] | None = None
    bias_axes: Sequence[str | None] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    platform: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.has_variable("params", "kernel_t"):
            kernel_t = jnp.asarray(nn.meta.unbox(self.get_variable("params", "kernel_t")), self.dtype)
            # One [M, K] . [N, K]^T product on either path: given several output or contracted dims, XLA:CPU's GEMM
            # would take a transposed copy of the weight at every call (the attention projections in prefill).
            x2, w2, out_shape = small_batch_matmul.matrix_operands(self.equation, x, kernel_t)
            if small_batch_matmul.use_kernel(self.equation, x, kernel_t, self.platform):  # CPU decode steps
                y = small_batch_matmul.matmul(x2, w2)
            else:
                y = _xla_einsum("mk,nk->mn", x2, w2, self.platform)
            y = y.reshape(out_shape)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
                tuple(self.kernel_shape),
                self.param_dtype,
            )
            y = _xla_einsum(self.equation, x, jnp.asarray(kernel, self.dtype), self.platform)
        if self.bias_shape is not None:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(self.bias_axes)),
                tuple(self.bias_shape),
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, jnp.float32)
        return y.astype(self.dtype)


def _xla_einsum(equation: str, x: jax.Array, w: jax.Array, platform: str) -> jax.Array:
    """einsum_f32_accumulate, with a bfloat16 single row run as two in a CPU program (see _needs_second_row)."""
    pad_row = _needs_second_row(equation, x, platform)
    if pad_row:  # [1, ...] -> [2, ...]
        x = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    y = einsum_f32_accumulate(equation, x, w)
    return y[:1] if pad_row else y


def _split_equation(equation: str) -> tuple[str, str, str]:
    """"lhs,rhs->out" -> (lhs, rhs, out)."""
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    return lhs, rhs, out


def _transposable(equation: str) -> bool:
    """Every index of "lhs,rhs->out" appears in exactly two of the three (no traces, no one-sided sums)."""
    parts = lhs, rhs, out = _split_equation(equation)
    return (all(len(set(part)) == len(part) for part in parts)
            and all(sum(letter in part for part in parts) == 2 for letter in set(lhs + rhs + out)))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


def _low_precision_einsum_fwd(equation, x, w):
    return _low_precision_einsum(equation, x, w), (x, w)


def _low_precision_einsum_bwd(equation, residuals, g):
    x, w = residuals
    lhs, rhs, out = _split_equation(equation)
    g = g.astype(x.dtype)  # the cotangent in the compute dtype: both backward products stay bf16 x bf16
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def einsum_f32_accumulate(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum with float32 accumulation (float32 result), for x and w of one compute dtype.

    In bfloat16 plain autodiff would run both backward products with the float32 cotangent against a bfloat16
    operand, i.e. as float32 matmuls after converting the bf16 operand (XLA:CPU: ~2x slower than bf16 x bf16
    with f32 accumulation, plus slow converts). Here the cotangent is rounded to the compute dtype first and
    both backward products accumulate in float32, as PyTorch's autocast does."""
    if x.dtype == jnp.float32 or x.dtype != w.dtype or not _transposable(equation):
        return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
    return _low_precision_einsum(equation, x, w)


def _needs_second_row(equation: str, x: jax.Array, platform: str = "auto") -> bool:
    """Whether a bfloat16 projection of a single row should run as two rows: only in a CPU program.

    XLA:CPU's bfloat16 matrix-vector product ([1, D] x [D, F]) falls back to a slow path (~15x slower than
    [2, D] x [D, F], measured in docs/performance.md); one zero row makes it a matrix-matrix product at the same
    memory traffic. Applies when every non-contracted dim of x is 1 and x's leading dim leads the output too
    (batch-first equations such as "btd,df->btf"), i.e. batch-1 decode steps.
    """
    if x.dtype != jnp.bfloat16 or not target.cpu_paths(platform):
        return False
    x_dims, kernel_dims, out = _split_equation(equation)
    rows = [size for dim, size in zip(x_dims, x.shape) if dim not in kernel_dims]
    return all(size == 1 for size in rows) and len(rows) > 0 and out[0] == x_dims[0] and x_dims[0] not in kernel_dims


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back to the compute dtype, then scale by the weight."""

    dim: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (self.dim,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; lookup returns the compute dtype (`take_rows` for `platform`)."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    platform: str = "auto"

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(default_kernel_init, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )
        return take_rows(jnp.asarray(table, self.dtype), ids, platform=self.platform)


def take_rows(table: jax.Array, ids: jax.Array, axis: int = 0, platform: str = "auto") -> jax.Array:
    """`jnp.take(table, ids, axis, mode="clip")`: the entries of `table` at `ids` along `axis` (embedding rows,
    [V, D] x int [...] -> [..., D]; or one step of a stream), out-of-range ids clipped.

    XLA:CPU runs a bfloat16 gather in float32: it converts the table, which costs nothing where the conversion
    fuses into the gather (only the gathered entries are read), but inside a decode loop the conversion of a
    loop-invariant table is hoisted out of it: a float32 copy of the whole table per decode call (519 MB, ~110 ms
    for a 151936 x 896 embedding). The barrier ties the table to the ids, which vary per step, so nothing about
    it is hoisted. The barrier is there in a CPU program only (`omni_jax.kernels.target.cpu_paths`).
    """
    if target.cpu_paths(platform):
        table, ids = jax.lax.optimization_barrier((table, ids))
    # mode="clip": an out-of-range id (e.g. a pad id beyond a small test vocabulary) must not produce NaN rows,
    # which would leak through attention even where masked (0 * NaN).
    return jnp.take(table, ids, axis=axis, mode="clip")


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names (no-op without a mesh)."""
    return nn.with_logical_constraint(x, tuple(axes))
