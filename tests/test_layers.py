"""models.layers.einsum_f32_accumulate: bfloat16 backward products stay bf16 x bf16 (f32 accumulation) and give
the float32 gradients to bf16 precision; float32 takes the plain path. models.layers.take_rows: the embedding
gather equals jnp.take in value and gradient, and never converts a 16-bit table as a whole."""
from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.models.layers import _transposable, einsum_f32_accumulate, take_rows


def _dot_operand_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    found = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr)
    return found


@pytest.mark.parametrize("equation,x_shape,w_shape", [("btd,df->btf", (2, 5, 8), (8, 16)),
                                                      ("btnh,nhd->btd", (2, 3, 4, 8), (4, 8, 16)),
                                                      ("btd,dnh->btnh", (2, 3, 16), (16, 4, 8))])
def test_bfloat16_gradients(equation, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)

    def loss(einsum, dtype):
        return lambda x, w: jnp.sum(jnp.sin(einsum(equation, x.astype(dtype), w.astype(dtype)).astype(jnp.float32)))

    plain = lambda e, a, b: jnp.einsum(e, a, b, preferred_element_type=jnp.float32)  # noqa: E731
    ref = jax.grad(loss(plain, jnp.float32), argnums=(0, 1))(x, w)
    got = jax.grad(loss(einsum_f32_accumulate, jnp.bfloat16), argnums=(0, 1))(x, w)
    for a, b in zip(ref, got):
        # bf16 operands and cotangent: ~3 significant digits relative to the largest entry
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 2e-2
    dtypes = _dot_operand_dtypes(jax.grad(loss(einsum_f32_accumulate, jnp.bfloat16), argnums=(0, 1)), x, w)
    assert len(dtypes) == 3 and all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes
    # plain autodiff would mix a float32 cotangent into the backward products
    mixed = _dot_operand_dtypes(jax.grad(loss(plain, jnp.bfloat16), argnums=(0, 1)), x, w)
    assert any("float32" in d for d in mixed)
    # float32: the plain path, identical gradients
    same = jax.grad(loss(einsum_f32_accumulate, jnp.float32), argnums=(0, 1))(x, w)
    for a, b in zip(ref, same):
        np.testing.assert_array_equal(a, b)


def test_transposable():
    assert _transposable("btd,df->btf") and _transposable("btnh,nhd->btd")
    assert not _transposable("ii,ij->j") and not _transposable("btd,df->bt")


def _plain_take(table, ids):
    return jnp.take(table, ids, axis=0, mode="clip")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_take_rows_equals_take(dtype):
    table = jax.random.normal(jax.random.key(0), (50, 6)).astype(dtype)
    ids = jnp.array([[0, 3, 49, 70, -2], [7, 7, 1, 0, 2]])  # 70 and -2 are out of range: clipped
    np.testing.assert_array_equal(np.asarray(take_rows(table, ids), np.float32),
                                  np.asarray(jnp.take(table, ids, axis=0, mode="clip"), np.float32))

    def loss(take):
        return lambda t: jnp.sum(jnp.sin(take(t, ids).astype(jnp.float32)) * jnp.arange(6.0))

    grad, ref = jax.grad(loss(take_rows))(table), jax.grad(loss(_plain_take))(table)
    assert grad.dtype == ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(ref, np.float32))  # same scatter-add


def test_take_rows_does_not_convert_the_table():
    """XLA:CPU runs a bf16 gather in f32 by converting the table, and hoists that conversion out of decode loops."""
    table = jnp.zeros((1000, 64), jnp.bfloat16)

    def temp_bytes(take):
        def loop(t, ids):
            body = lambda i, acc: acc + take(t, ids + i).astype(jnp.float32)  # noqa: E731
            return jax.lax.fori_loop(0, 4, body, jnp.zeros((8, 64)))
        compiled = jax.jit(loop).lower(table, jnp.zeros((8,), jnp.int32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    if jax.default_backend() == "cpu":  # the behaviour this guards against is still there in the plain gather
        assert temp_bytes(_plain_take) >= table.size * 4  # a float32 copy of the table
    assert temp_bytes(take_rows) < table.size  # a few [8, 64] rows
