"""The fused chunked lm_head + cross-entropy equals the plain one: value and gradients (hidden, kernel, weights)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.models.linear_cross_entropy import linear_cross_entropy


def _plain(hidden, kernel, targets, weights):
    logits = jnp.einsum("nd,dv->nv", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * weights)


@pytest.mark.parametrize("n,dim,vocab,chunk", [(37, 16, 50, 8), (64, 24, 301, 64), (5, 8, 1000, 16)])
def test_fused_equals_plain(n, dim, vocab, chunk):
    rng = np.random.default_rng(n)
    hidden = jnp.asarray(rng.standard_normal((n, dim)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((dim, vocab)) * dim**-0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
    weights = jnp.asarray((rng.random(n) > 0.3) * rng.random(n), jnp.float32)  # zeros and fractional weights
    plain = jax.value_and_grad(_plain, argnums=(0, 1, 3))(hidden, kernel, targets, weights)
    fused = jax.jit(jax.value_and_grad(lambda h, k, t, w: linear_cross_entropy(h, k, t, w, chunk), argnums=(0, 1, 3)))(
        hidden, kernel, targets, weights)
    # 1e-5 relative: the same float32 sums, accumulated per chunk instead of in one dot
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(fused)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # not differentiated: the primal path (no gradient work) gives the same value
    np.testing.assert_allclose(linear_cross_entropy(hidden, kernel, targets, weights, chunk), plain[0], rtol=1e-6)


def test_bfloat16_hidden_gives_bfloat16_gradient_close_to_float32():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((20, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 40)) * 0.25, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, 20), jnp.int32)
    weights = jnp.ones((20,), jnp.float32)
    grad = jax.grad(lambda h, k: linear_cross_entropy(h, k, targets, weights, 8), argnums=(0, 1))
    g16 = grad(hidden.astype(jnp.bfloat16), kernel)
    g32 = grad(hidden, kernel)
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
    # bf16 matmul inputs: ~3 significant digits
    np.testing.assert_allclose(np.asarray(g16[0], np.float32), g32[0], atol=2e-2)
    np.testing.assert_allclose(g16[1], g32[1], atol=2e-2)
