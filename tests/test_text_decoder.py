"""Decoder-stack properties that need no oracle: remat policies, cached decode vs full forward, packing; and the
bfloat16 SwiGLU against PyTorch's."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.config import AudioEncoderConfig, RuntimeOptions, TextConfig, ThinkerConfig, VisionEncoderConfig
from omni_jax.models.kv_cache import KVCache
from omni_jax.models.text_decoder import swiglu
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


def test_unrolled_layers_equal_scanned_with_converted_params(params):
    """scan_layers=False (per-layer weights, serving) computes what the scanned stack computes: full forward,
    cached prefill + one-token decode, and bfloat16 one-row decode (the two-row GEMV path); the layout conversion
    goes both ways without changing a value."""
    from omni_jax.layer_layout import match_layer_layout

    scanned, unrolled = _model(), _model(scan_layers=False)
    ids, pos, seg = _inputs(length=9, seed=3)
    wanted = nn.meta.unbox(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), ids, pos, seg)))["params"]
    per_layer = match_layer_layout(params["params"], wanted)
    assert "layers" not in per_layer["decoder"] and len(per_layer["decoder"]) == TEXT.num_hidden_layers + 1
    back = match_layer_layout(per_layer, params["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params["params"])
    with pytest.raises(ValueError, match="leading sizes"):
        match_layer_layout(params["params"], nn.meta.unbox(jax.eval_shape(lambda: Thinker(
            ThinkerConfig(text=dataclasses.replace(TEXT, num_hidden_layers=2), audio=THINKER.audio, vision=THINKER.vision),
            RuntimeOptions(scan_layers=False)).init(jax.random.key(0), ids, pos, seg)))["params"])

    # 1e-6: the same float32 ops in a different program (scan body vs unrolled), XLA may fuse differently
    np.testing.assert_allclose(unrolled.apply({"params": per_layer}, ids, pos, seg).logits,
                               scanned.apply(params, ids, pos, seg).logits, atol=1e-6, rtol=1e-6)
    for dtype in ("float32", "bfloat16"):
        outs = []
        for model, p in ((_model(dtype=dtype), params["params"]), (_model(dtype=dtype, scan_layers=False), per_layer)):
            cache = KVCache.init(TEXT.num_hidden_layers, 1, 12, TEXT.num_key_value_heads, TEXT.head_dim,
                                 jnp.dtype(dtype))
            out = model.apply({"params": p}, ids[:1, :8], pos[:, :1, :8], seg[:1, :8], cache)
            step = model.apply({"params": p}, ids[:1, 8:], pos[:, :1, 8:], seg[:1, 8:], out.cache)
            outs.append(np.asarray(step.logits, np.float32))
        # bf16: both programs round the same bf16 values; 2e-2 = a few bf16 ulps of O(1) logits
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-5 if dtype == "float32" else 2e-2)


def test_bfloat16_swiglu_rounds_as_torch():
    """silu(gate) * up in bfloat16 equals torch's bit for bit (f32 arithmetic, two roundings); rounding after
    every op, as plain bf16 jnp ops do, differs on about a third of the elements."""
    rng = np.random.default_rng(0)
    gate = torch.tensor(rng.standard_normal((16, 2048)) * 4, dtype=torch.float32).bfloat16()
    up = torch.tensor(rng.standard_normal((16, 2048)), dtype=torch.float32).bfloat16()
    expected = (torch.nn.functional.silu(gate) * up).float().numpy()
    as_jax = lambda t: jnp.asarray(t.float().numpy(), jnp.bfloat16)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(swiglu(as_jax(gate), as_jax(up)), np.float32), expected)
    g32 = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    u32 = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    np.testing.assert_array_equal(swiglu(g32, u32), nn.silu(g32) * u32)  # float32: the same ops, no rounding
