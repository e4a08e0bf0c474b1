"""Token2Wav DiT (velocity field, ECAPA, block masks, head-0 RoPE) and the flow-matching sampler against HF
transformers (PyTorch CPU, float32) on a small random model; weight conversion round trip."""
from __future__ import annotations


import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniDiTConfig
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf_omni

from hf_models import randomize_dit_
from omni_jax.config import DiTConfig
from omni_jax.models import dit as dit_lib
from omni_jax.models.dit import DiT, block_attention_mask, hf_to_params, layer_windows, params_to_hf
from omni_jax.models.ecapa import ECAPATimeDelayNet
from omni_jax.models.flow_matching import make_noise, sample_mel, time_points

TOL = 1e-4
CFG = DiTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=16, ff_mult=2, emb_dim=32,
                enc_dim=32, enc_channels=(32, 32, 32, 32, 96), enc_attention_channels=16, enc_se_channels=16,
                look_ahead_layers=(1,), look_backward_layers=(0, 2), block_size=24, num_embeds=8193, mel_dim=80,
                enc_emb_dim=192, repeats=2)
T_REF = 37  # odd, and longer than the largest reflect pad (4)


@pytest.fixture(scope="module")
def hf_dit():
    config = Qwen2_5OmniDiTConfig(**CFG.to_hf_config())
    config._attn_implementation = "sdpa"  # the DiT attention does not support HF's eager path
    torch.manual_seed(0)
    model = hf_omni.Qwen2_5OmniToken2WavDiTModel(config)
    randomize_dit_(model)
    return model.eval()  # spec §14.13: dropout is active until .eval()


@pytest.fixture(scope="module")
def ours(hf_dit):
    module = DiT(CFG)
    params = {"params": hf_to_params(hf_dit.state_dict(), CFG)}
    return module, params, jax.jit(module.apply, static_argnames=("apply_cfg",))


def _inputs(seed: int, batch: int, length: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, CFG.mel_dim)).astype(np.float32)
    codes = rng.integers(0, CFG.num_embeds + 1, (batch, length // CFG.repeats))
    cond = rng.standard_normal((batch, CFG.enc_emb_dim)).astype(np.float32)
    ref_mel = rng.standard_normal((batch, T_REF, CFG.mel_dim)).astype(np.float32)
    return x, codes, cond, ref_mel


def _hf_forward(model, x, codes, cond, ref_mel, t, **kw):
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x),
                    speaker_embedding=torch.from_numpy(cond)[:, None, :].repeat(1, x.shape[1], 1),
                    condition_vector=torch.from_numpy(ref_mel), quantized_code=torch.from_numpy(codes),
                    time_step=torch.as_tensor(t, dtype=torch.float32), **kw)
    return out.numpy()


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------ weights


def test_weight_round_trip_covers_every_key(hf_dit, ours):
    module, params, _ = ours
    sd = {k: v.numpy() for k, v in hf_dit.state_dict().items()}
    back = params_to_hf(params, CFG)
    assert set(back) == set(sd)
    for name, value in sd.items():
        assert back[name].shape == value.shape and np.array_equal(back[name], value), name
    again = hf_to_params(back, CFG)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(again),
                                                      jax.tree_util.tree_leaves(params["params"])))
    # The converted tree has exactly the structure and shapes DiT.init creates.
    x, codes, cond, ref_mel = _inputs(0, 1, 48)
    init = jax.eval_shape(lambda: module.init(jax.random.key(0), x, codes, cond, ref_mel, 0.5))
    want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(nn_unbox(init)["params"], sep="/").items()}
    got = {k: v.shape for k, v in flax.traverse_util.flatten_dict(params["params"], sep="/").items()}
    assert got == want
    # The full-model prefix is accepted; a missing or extra tensor is reported by name.
    prefixed = {dit_lib.HF_PREFIX + k: v for k, v in sd.items()}
    hf_to_params(prefixed, CFG)
    broken = dict(sd)
    del broken["transformer_blocks.1.attn.to_k.weight"]
    broken["transformer_blocks.7.attn.to_k.weight"] = sd["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.to_k\.weight[\s\S]*transformer_blocks\.7"):
        hf_to_params(broken, CFG)


def nn_unbox(tree):
    return flax.linen.meta.unbox(tree)


# ------------------------------------------------------------------------------------------ ECAPA


@pytest.mark.parametrize("zero", [False, True], ids=["ref_mel", "zeros"])
def test_ecapa_matches_hf(hf_dit, ours, zero):
    _, params, _ = ours
    _, _, _, ref_mel = _inputs(1, 2, 48)
    if zero:  # the unconditional branch feeds zeros through ECAPA (std hits the 1e-12 clamp)
        ref_mel = np.zeros_like(ref_mel)
    with torch.no_grad():
        want = hf_dit.input_embed.spk_encoder(torch.from_numpy(ref_mel)).numpy()
    got = ECAPATimeDelayNet(CFG).apply({"params": params["params"]["input_embed"]["spk_encoder"]}, ref_mel)
    assert got.shape == want.shape == (2, CFG.enc_dim)
    err = _max_err(got, want)
    print(f"ECAPA ({'zeros' if zero else 'ref_mel'}) max abs err {err:.2e}, |out| max {np.abs(want).max():.2f}")
    assert err < TOL


# ------------------------------------------------------------------------------------------ velocity field


@pytest.mark.parametrize("length", [48, 50, 100])
def test_velocity_matches_hf(hf_dit, ours, length):
    _, params, apply = ours
    x, codes, cond, ref_mel = _inputs(length, 2, length)
    t = np.float32(0.37)
    t_rows = np.full((2,), t)
    want = _hf_forward(hf_dit, x, codes, cond, ref_mel, t, apply_cfg=True)  # [cond rows; uncond rows]
    got = np.asarray(apply(params, x, codes, cond, ref_mel, t_rows, np.zeros(2, bool), apply_cfg=True))
    assert got.shape == want.shape == (4, length, CFG.mel_dim)
    assert np.abs(want).mean() > 0.3  # O(1) velocities: the tolerance is meaningful
    errs = dict(cfg=_max_err(got, want))

    # Unbatched branches (one compiled shape: t and drop_condition always per row): conditional, unconditional
    # via drop_condition, and a per-row mask with per-row t.
    want_c = _hf_forward(hf_dit, x, codes, cond, ref_mel, t, apply_cfg=False)
    want_u = _hf_forward(hf_dit, x, codes, cond, ref_mel, t, apply_cfg=False, drop_audio_conditioning=True,
                         drop_code=True)
    assert _max_err(want[:2], want_c) < 1e-5 and _max_err(want[2:], want_u) < 1e-5  # HF's own CFG halves
    errs["cond"] = _max_err(apply(params, x, codes, cond, ref_mel, t_rows, np.zeros(2, bool)), want_c)
    errs["uncond"] = _max_err(apply(params, x, codes, cond, ref_mel, t_rows, np.ones(2, bool)), want_u)
    mixed_t = np.array([0.1, 0.9], np.float32)
    want_mixed = np.concatenate([
        _hf_forward(hf_dit, x[:1], codes[:1], cond[:1], ref_mel[:1], mixed_t[:1], apply_cfg=False),
        _hf_forward(hf_dit, x[1:], codes[1:], cond[1:], ref_mel[1:], mixed_t[1:], apply_cfg=False,
                    drop_audio_conditioning=True, drop_code=True)])
    errs["mixed"] = _max_err(apply(params, x, codes, cond, ref_mel, mixed_t, np.array([False, True])), want_mixed)
    print(f"velocity T={length}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) < TOL, errs


def test_bad_shapes_are_reported(ours):
    _, params, apply = ours
    x, codes, cond, ref_mel = _inputs(0, 2, 48)
    with pytest.raises(ValueError, match="codes"):
        apply(params, x, codes[:, :-1], cond, ref_mel, 0.5)
    with pytest.raises(ValueError, match="cond"):
        apply(params, x, codes, cond[:, :10], ref_mel, 0.5)


# ------------------------------------------------------------------------------------------ RoPE quirk


def _rope_all_heads(x, cos, sin):
    batch, length, heads, head_dim = x.shape
    pairs = x.reshape(batch, length, heads, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x.shape)


def _rope_half_split_head0(x, cos, sin):
    half = x.shape[-1] // 2
    head = x[:, :, 0, :]
    a, b = head[..., :half], head[..., half:]
    return x.at[:, :, 0, :].set(jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1))


def test_rope_only_head0_interleaved(hf_dit, ours, monkeypatch):
    """The reference rotates head 0 only, on interleaved channel pairs; both wrong variants must fail parity."""
    module, params, _ = ours
    x, codes, cond, ref_mel = _inputs(7, 1, 72)
    want = _hf_forward(hf_dit, x, codes, cond, ref_mel, np.float32(0.6), apply_cfg=False)

    def run():  # a fresh function object, so jit traces again and sees the patched RoPE
        return np.asarray(jax.jit(lambda *args: module.apply(*args))(params, x, codes, cond, ref_mel, 0.6))

    assert _max_err(run(), want) < TOL
    original = dit_lib.apply_rope_head0
    errs = {}
    for name, variant in (("all heads", _rope_all_heads), ("half-split pairs", _rope_half_split_head0)):
        monkeypatch.setattr(dit_lib, "apply_rope_head0", variant)
        errs[name] = _max_err(run(), want)
    monkeypatch.setattr(dit_lib, "apply_rope_head0", original)
    print("wrong RoPE variants, max abs err:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert min(errs.values()) > 100 * TOL, errs


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("look_ahead,look_back,blocks", [
    (0, 0, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
    (1, 0, [[1, 1, 0], [0, 1, 1], [0, 0, 1]]),
    (0, 1, [[1, 0, 0], [1, 1, 0], [0, 1, 1]]),
    (1, 1, [[1, 1, 0], [1, 1, 1], [0, 1, 1]]),
])
def test_block_mask_semantics(hf_dit, look_ahead, look_back, blocks):
    bs = CFG.block_size
    length = 3 * bs
    got = np.asarray(block_attention_mask(length, bs, look_ahead, look_back))
    want = np.kron(np.array(blocks), np.ones((bs, bs), int)).astype(bool)  # rows: query block, cols: key block
    np.testing.assert_array_equal(got, want)
    # HF's own construction (DiTDecoderLayer), from the model's block difference tensor.
    diff = hf_dit._create_block_diff(torch.zeros(1, length, 1))[0, 0]
    hf_mask = ((diff >= -float(look_back)) & (diff <= float(look_ahead))).numpy()
    np.testing.assert_array_equal(got, hf_mask)
    # A partial last block (T = 50: blocks of 24, 24, 2).
    part = np.asarray(block_attention_mask(50, bs, look_ahead, look_back))
    np.testing.assert_array_equal(part, want[:50, :50])


def test_layer_windows_match_hf(hf_dit):
    hf = [[blk.look_ahead_block, blk.look_backward_block] for blk in hf_dit.transformer_blocks]
    np.testing.assert_array_equal(layer_windows(CFG), np.array(hf))
    assert layer_windows(CFG).tolist() == [[0, 1], [1, 0], [0, 1]]


# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("num_steps,sway", [(10, -1.0), (10, None), (7, 0.3), (2, -1.0)])
def test_time_points_match_torch(num_steps, sway):
    t = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    if sway is not None:
        t += sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    np.testing.assert_allclose(time_points(num_steps, sway), t.numpy(), rtol=0, atol=1e-7)


def test_sampler_matches_hf(hf_dit, ours, monkeypatch):
    module, params, _ = ours
    n, batch = 25, 2  # T = 50 frames: blocks of 24, 24, 2
    _, codes, cond, ref_mel = _inputs(3, batch, 2 * n)
    noise = make_noise(jax.random.key(0), batch, n, CFG)
    assert noise.shape == (batch, 2 * n, CFG.mel_dim) and noise.dtype == jnp.float32

    injected = torch.from_numpy(np.array(noise))
    real_randn = torch.randn

    def fake_randn(*args, **kwargs):
        shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else tuple(args)
        return injected.clone() if shape == tuple(injected.shape) else real_randn(*args, **kwargs)

    trajectories = []
    integrate = hf_omni.RungeKutta4ODESolver.integrate

    def recording_integrate(self, time_points_):
        solution = integrate(self, time_points_)
        trajectories.append(solution.clone())
        return solution

    monkeypatch.setattr(torch, "randn", fake_randn)
    monkeypatch.setattr(hf_omni.RungeKutta4ODESolver, "integrate", recording_integrate)
    with torch.no_grad():
        want_mel = hf_dit.sample(torch.from_numpy(cond), torch.from_numpy(ref_mel), torch.from_numpy(codes),
                                 num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0).numpy()
    monkeypatch.undo()
    want_states = trajectories[0].numpy()  # [10, B, T, mel]

    mel, states = sample_mel(module.apply, params, codes, cond, ref_mel, noise, num_steps=10, guidance_scale=0.5,
                             sway_coefficient=-1.0, return_trajectory=True)
    assert mel.shape == want_mel.shape == (batch, CFG.mel_dim, 2 * n)
    assert states.shape == want_states.shape == (10, batch, 2 * n, CFG.mel_dim)
    state_errs = [_max_err(states[i], want_states[i]) for i in range(10)]
    mel_err = _max_err(mel, want_mel)
    print(f"sampler: final mel max abs err {mel_err:.2e} (|mel| max {np.abs(want_mel).max():.2f}); per state "
          + " ".join(f"{e:.1e}" for e in state_errs))
    assert state_errs[0] == 0.0
    assert mel_err < TOL and max(state_errs) < TOL


def test_sampler_is_one_scan_over_intervals(ours):
    module, params, _ = ours
    _, codes, cond, ref_mel = _inputs(4, 1, 48)
    noise = make_noise(jax.random.key(1), 1, 24, CFG)
    jaxpr = jax.make_jaxpr(lambda p: sample_mel(module.apply, p, codes, cond, ref_mel, noise))(params)
    inner = jaxpr.eqns[0].params["jaxpr"].jaxpr  # the jitted sampler
    scans = [e for e in inner.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [9]
    # 4 DiT calls per RK4 step, each one scan over the layers.
    body = scans[0].params["jaxpr"].jaxpr
    layer_scans = [e for e in body.eqns if e.primitive.name == "scan" and e.params["length"] == CFG.num_hidden_layers]
    assert len(layer_scans) == 4


def test_sampler_without_guidance_matches_hf(hf_dit, ours, monkeypatch):
    """guidance_scale < 1e-5: one conditional DiT call per evaluation (HF skips the CFG batch)."""
    module, params, _ = ours
    n = 24
    _, codes, cond, ref_mel = _inputs(5, 1, 2 * n)
    noise = make_noise(jax.random.key(2), 1, n, CFG)
    injected = torch.from_numpy(np.array(noise))
    monkeypatch.setattr(torch, "randn", lambda *a, **k: injected.clone())
    with torch.no_grad():
        want = hf_dit.sample(torch.from_numpy(cond), torch.from_numpy(ref_mel), torch.from_numpy(codes),
                             num_steps=3, guidance_scale=0.0, sway_coefficient=None).numpy()
    monkeypatch.undo()
    got = sample_mel(module.apply, params, codes, cond, ref_mel, noise, num_steps=3, guidance_scale=0.0,
                     sway_coefficient=None)
    assert _max_err(got, want) < TOL


# ------------------------------------------------------------------------------------------ block-local attention


@pytest.mark.parametrize("length", [24, 50, 97])
def test_block_local_attention_equals_dense_mask(length):
    """The block-by-block attention (what the DiT runs on CPU) equals dense attention under the [T, T] block mask
    and a key mask, for every (look_ahead, look_back) window and partial last blocks."""
    from omni_jax.models.attention import attention, bidirectional_mask

    rng = np.random.default_rng(length)
    q, k, v = (jnp.asarray(rng.standard_normal((2, length, 4, 16)), jnp.float32) for _ in range(3))
    valid = np.ones((2, length), bool)
    valid[1, length - length // 3:] = False  # row 1: a padded tail (queries there are don't-care)
    for window in ([0, 0], [1, 0], [0, 1], [1, 1]):
        allowed = block_attention_mask(length, CFG.block_size, *window)
        mask = bidirectional_mask(jnp.asarray(valid, jnp.int32)).replace(
            allowed=jnp.broadcast_to(allowed[None], (2, length, length)))
        want = np.asarray(attention(q, k, v, mask, scale=0.25))
        got = np.asarray(dit_lib.block_local_attention(q, k, v, jnp.asarray(window), jnp.asarray(valid),
                                                       block_size=CFG.block_size, max_back=1, max_ahead=1,
                                                       scale=0.25))
        assert got.shape == want.shape
        assert _max_err(got[valid], want[valid]) < 1e-5, window


def test_padded_length_with_frame_mask_equals_unpadded(ours):
    """Length bucketing: padding the mel to a longer bucket with frame_mask 0 on the pad leaves the real frames'
    velocity unchanged (padded keys get no weight in any layer)."""
    _, params, apply = ours
    x, codes, cond, ref_mel = _inputs(11, 2, 50)
    t_rows = np.full((2,), 0.4, np.float32)
    want = np.asarray(apply(params, x, codes, cond, ref_mel, t_rows, np.zeros(2, bool), apply_cfg=True))
    pad = 72 - 50
    x_pad = np.concatenate([x, np.random.default_rng(0).standard_normal((2, pad, CFG.mel_dim)).astype(np.float32)], 1)
    codes_pad = np.concatenate([codes, np.full((2, pad // 2), 5)], 1)
    frame_mask = np.concatenate([np.ones((2, 50)), np.zeros((2, pad))], 1).astype(np.int32)
    got = np.asarray(apply(params, x_pad, codes_pad, cond, ref_mel, t_rows, np.zeros(2, bool), apply_cfg=True,
                           frame_mask=frame_mask))
    assert got.shape == (4, 72, CFG.mel_dim)
    assert _max_err(got[:, :50], want) < 1e-5
