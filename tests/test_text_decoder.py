"""Decoder-stack properties that need no oracle: remat policies, cached decode vs full forward, packing."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.config import AudioEncoderConfig, RuntimeOptions, TextConfig, ThinkerConfig, VisionEncoderConfig
from omni_jax.models.kv_cache import KVCache
from omni_jax.models.thinker import Thinker

TEXT = TextConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, mrope_section=(2, 1, 1))


THINKER = ThinkerConfig(text=TEXT, audio=AudioEncoderConfig(output_dim=32),
                        vision=VisionEncoderConfig(out_hidden_size=32))


def _model(**opts):
    return Thinker(THINKER, RuntimeOptions(**opts))


def _inputs(batch=2, length=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, TEXT.vocab_size, (batch, length)), jnp.int32)
    seg = jnp.ones((batch, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, None], (3, batch, length))
    return ids, pos, seg


@pytest.fixture(scope="module")
def params():
    ids, pos, seg = _inputs()
    return nn.meta.unbox(_model().init(jax.random.key(0), ids, pos, seg))


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims"])
def test_remat_policies_give_the_same_gradients(params, policy):
    ids, pos, seg = _inputs()

    def loss(p, model):
        logits = model.apply(p, ids, pos, seg).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    ref = jax.grad(loss)(params, _model())
    got = jax.jit(jax.grad(loss), static_argnums=1)(params, _model(remat_policy=policy))
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_cached_prefill_and_decode_equal_full_forward(params):
    model = _model()
    ids, pos, seg = _inputs(length=12, seed=1)
    full = model.apply(params, ids, pos, seg).logits
    cache = KVCache.init(TEXT.num_hidden_layers, 2, 20, TEXT.num_key_value_heads, TEXT.head_dim, jnp.float32)
    out = model.apply(params, ids[:, :7], pos[:, :, :7], seg[:, :7], cache)
    np.testing.assert_allclose(out.logits, full[:, :7], atol=1e-5)
    cache = out.cache
    for t in range(7, 12):
        out = model.apply(params, ids[:, t:t + 1], pos[:, :, t:t + 1], seg[:, t:t + 1], cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=1e-5)
    assert int(cache.length) == 12


def test_packed_segments_equal_separate_sequences(params):
    """Two sequences packed in one row (segment ids 1, 2) give the logits each gets alone."""
    model = _model()
    ids, _, _ = _inputs(batch=1, length=11, seed=2)
    seg = jnp.asarray([[1] * 6 + [2] * 5], jnp.int32)
    local = jnp.asarray([list(range(6)) + list(range(5))], jnp.int32)
    pos = jnp.broadcast_to(local[None], (3, 1, 11))
    packed = model.apply(params, ids, pos, seg).logits
    for sl in (slice(0, 6), slice(6, 11)):
        n = sl.stop - sl.start
        alone = model.apply(params, ids[:, sl], pos[:, :, :n] * 0 + jnp.arange(n)[None, None],
                            jnp.ones((1, n), jnp.int32)).logits
        np.testing.assert_allclose(packed[:, sl], alone, atol=1e-5)


def test_pallas_backend_equals_xla(params):
    ids, pos, seg = _inputs(length=19, seed=3)
    seg = seg.at[0, :5].set(0)  # left padding in row 0
    ref = _model().apply(params, ids, pos, seg).logits
    got = _model(attention_backend="pallas").apply(params, ids, pos, seg).logits
    valid = np.asarray(seg, bool)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=1e-5)
