"""The CPU blocked attention path equals dense attention for every mask shape the model uses, values and
gradients: causal, packed segments, left padding, a KV cache longer than the queries (generation prefill, S not a
multiple of the block), bidirectional windows (encoders), GQA, T not a multiple of the block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.models import attention as attn
from omni_jax.models.attention import AttentionMask


def _case(name, rng, batch=2, q_len=300, kv_len=300):
    slots_q = np.broadcast_to(np.arange(q_len), (batch, q_len)).astype(np.int32)
    slots_kv = np.broadcast_to(np.arange(kv_len), (batch, kv_len)).astype(np.int32)
    seg = np.ones((batch, q_len), np.int32)
    causal = True
    if name == "packed":  # three segments in row 0, two in row 1
        seg[0, 100:220], seg[0, 220:] = 2, 3
        seg[1, 150:] = 2
    elif name == "left_padding":
        seg[0, :37] = 0
        seg[1, :200] = 0
    elif name == "windows":  # encoder-style: bidirectional within windows of 64, last window padding
        seg = (np.arange(q_len) // 64 + 1)[None].repeat(batch, 0).astype(np.int32)
        seg[1, 256:] = 0
        causal = False
    kv_seg = seg
    if name == "cache":  # prefill into a longer cache: keys beyond the prompt are empty slots (segment 0)
        kv_seg = np.zeros((batch, kv_len), np.int32)
        kv_seg[:, :q_len] = seg
        kv_seg[1, :21] = 0  # left padding in row 1
        seg = seg.copy()
        seg[1, :21] = 0
    return AttentionMask(jnp.asarray(seg), jnp.asarray(kv_seg), jnp.asarray(slots_q), jnp.asarray(slots_kv),
                         causal=causal)


@pytest.mark.parametrize("name,q_len,kv_len", [("causal", 300, 300), ("packed", 300, 300),
                                               ("left_padding", 256, 256), ("cache", 260, 333),
                                               ("windows", 320, 320)])
def test_blocked_equals_dense(name, q_len, kv_len):
    rng = np.random.default_rng(q_len + kv_len)
    heads, kv_heads, dim = 6, 2, 16
    q = jnp.asarray(rng.standard_normal((2, q_len, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, kv_len, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, kv_len, kv_heads, dim)), jnp.float32)
    mask = _case(name, rng, q_len=q_len, kv_len=kv_len)
    assert attn._use_blocked(q, k, mask) == (jax.default_backend() == "cpu")
    scale = dim**-0.5
    dense = attn._xla_attention(q, k, v, mask, scale)
    blocked = jax.jit(lambda q, k, v: attn._blocked_attention(q, k, v, mask, scale))(q, k, v)
    # 2e-6: the same float32 softmax, normalised per tile (online) instead of once
    np.testing.assert_allclose(blocked, dense, atol=2e-6, rtol=2e-6)

    weights = jnp.asarray(rng.standard_normal(dense.shape), jnp.float32)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask, scale) * weights)  # noqa: E731
    g_dense = jax.grad(loss(attn._xla_attention), argnums=(0, 1, 2))(q, k, v)
    g_blocked = jax.jit(jax.grad(loss(attn._blocked_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_dense, g_blocked):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_blocked_bfloat16_close_to_float32():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 4, 16)), jnp.float32) for _ in range(3))
    mask = _case("causal", rng, batch=1, q_len=256, kv_len=256)
    ref = attn._xla_attention(q, k, v, mask, 0.25)
    got = attn._blocked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, 0.25)
    assert got.dtype == jnp.bfloat16
    # bf16 inputs and probabilities: ~2-3 significant digits of O(1) outputs
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (12, 4), (4, 4)])
def test_decode_path_equals_dense(dtype, heads, kv_heads):
    """One query per row over a cache (left padding in row 1, empty slots at the end, a row with no allowed key):
    the CPU multiply-reduce decode path equals the dense einsum path."""
    rng = np.random.default_rng(heads)
    batch, slots, dim, written = 3, 37, 16, 30
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, slots, kv_heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, slots, kv_heads, dim)), dtype)
    kv_seg = np.zeros((batch, slots), np.int32)
    kv_seg[:, :written] = 1
    kv_seg[1, :11] = 0  # left padding
    q_seg = np.ones((batch, 1), np.int32)
    q_seg[2] = 0  # a padding query: no allowed key, output 0 on both paths
    mask = AttentionMask(jnp.asarray(q_seg), jnp.asarray(kv_seg), jnp.full((batch, 1), written - 1, jnp.int32),
                         jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots)), causal=True)
    assert attn._use_decode(q) == (jax.default_backend() == "cpu")
    dense = attn._xla_attention(q, k, v, mask, dim**-0.5)
    got = jax.jit(lambda q, k, v: attn._decode_attention(q, k, v, mask, dim**-0.5))(q, k, v)
    assert got.dtype == dtype and got.shape == dense.shape
    # float32: the same products summed in another order (2e-6). bfloat16: the same float32 sums and bf16-rounded
    # probabilities; the output's own bf16 rounding can differ by one ulp (2^-8 relative) after an f32 difference.
    tol = 2e-6 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(dense, np.float32), atol=tol, rtol=tol)
    assert np.all(np.asarray(got, np.float32)[2] == 0)
