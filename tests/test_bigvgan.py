"""BigVGAN vocoder against HF `Qwen2_5OmniToken2WavBigVGANModel` (float32, PyTorch CPU as the oracle).

The HF model is built from a small config with the released rates/kernels (5,3,2,2,2,2)/(11,7,4,4,4,4),
resblock kernels (3,7,11) and dilations (1,3,5); upsample_initial_channel 128, so the last stage still has
2 channels (64 would leave 1, which would not exercise the per-channel SnakeBeta parameters there).
Weights are re-drawn (HF's init leaves alpha = beta = 0 and the output tiny): conv weights ~ 0.8·N(0, 1/fan_in)
(1.0 makes the residual stream grow ~x2 per stage and the output is mostly clamped), conv_post another x0.5,
biases ~ N(0, 0.1^2), log-alpha/log-beta ~ N(0, 0.1^2). Input mels are uniform in [-12, 3] (natural log), so
the dB normalisation clamps at both ends.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniAntiAliasedActivation1d, Qwen2_5OmniSnakeBeta, Qwen2_5OmniToken2WavBigVGANModel,
    kaiser_sinc_filter1d)

from hf_models import randomize_bigvgan_
from omni_jax.config import BigVGANConfig
from omni_jax.models.bigvgan import (
    ANTI_ALIAS_FILTER, AntiAliasedSnakeBeta, BigVGAN, ConvTranspose1d, anti_aliased_snake_beta, hf_param_table,
    hf_to_params,
    kaiser_sinc_filter, params_to_hf, sin_squared)

SMALL = dict(mel_dim=80, upsample_initial_channel=128, resblock_kernel_sizes=(3, 7, 11),
             resblock_dilation_sizes=((1, 3, 5),) * 3, upsample_rates=(5, 3, 2, 2, 2, 2),
             upsample_kernel_sizes=(11, 7, 4, 4, 4, 4))
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return randomize_bigvgan_(Qwen2_5OmniToken2WavBigVGANModel(Qwen2_5OmniBigVGANConfig(**SMALL))).eval()


@pytest.fixture(scope="module")
def ours(hf_model):
    config = BigVGANConfig(**SMALL)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    module = BigVGAN(config)
    return module, {"params": hf_to_params(state, config)}, jax.jit(module.apply)


def random_mel(batch, frames, seed=0):
    return np.random.default_rng(seed).uniform(-12.0, 3.0, (batch, 80, frames)).astype(np.float32)


def hf_wave(model, mel):
    with torch.no_grad():
        out = model(torch.from_numpy(mel)).numpy()
    return out.reshape(mel.shape[0], -1)  # HF squeezes the batch dim away for batch 1


# ---------------------------------------------------------------------------------------- filters


def test_kaiser_filter_matches_hf_buffers(hf_model):
    up = hf_model.activation_post.upsample.filter.numpy().reshape(-1)
    down = hf_model.activation_post.downsample.filter.numpy().reshape(-1)
    np.testing.assert_allclose(ANTI_ALIAS_FILTER, up, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ANTI_ALIAS_FILTER, down, rtol=0, atol=1e-7)
    # other parameters: odd length, and the two lower-attenuation Kaiser-beta branches
    for cutoff, half_width, size in [(0.25, 0.3, 12), (0.5 / 3, 0.2, 18), (0.25, 0.3, 7), (0.2, 0.1, 6),
                                     (0.3, 0.05, 4)]:
        ref = kaiser_sinc_filter1d(cutoff, half_width, size).numpy().reshape(-1)
        np.testing.assert_allclose(kaiser_sinc_filter(cutoff, half_width, size), ref, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------- activation


def test_sin_squared_polynomial():
    rng = np.random.default_rng(3)
    z = np.concatenate([rng.normal(size=20000) * scale for scale in (1e-3, 0.3, 3, 30, 300, 3e4)])
    z = np.concatenate([z, np.arange(-50, 51) * np.pi / 2]).astype(np.float32)  # zeros and peaks of sin^2
    exact = np.sin(z.astype(np.float64)) ** 2
    np.testing.assert_allclose(np.asarray(jax.jit(sin_squared)(z)), exact, rtol=0, atol=3e-7)
    grad = np.asarray(jax.vmap(jax.grad(sin_squared))(z[:40000]))  # |z| up to ~1e3
    np.testing.assert_allclose(grad, np.sin(2 * z[:40000].astype(np.float64)), rtol=0, atol=1e-6)



@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_anti_aliased_snake_beta_matches_hf(platform):
    """Both forms (slices + polynomial on the CPU, depthwise convolutions + sin elsewhere; the TPU form runs
    here on the CPU devices: it has no kernel of its own) against HF."""
    channels = 6
    gen = torch.Generator().manual_seed(1)
    hf_act = Qwen2_5OmniAntiAliasedActivation1d(activation=Qwen2_5OmniSnakeBeta(channels))
    with torch.no_grad():
        hf_act.act.alpha.copy_(torch.randn(channels, generator=gen) * 0.5)
        hf_act.act.beta.copy_(torch.randn(channels, generator=gen) * 0.5)
    params = {"params": {"alpha": hf_act.act.alpha.detach().numpy(), "beta": hf_act.act.beta.detach().numpy()}}
    module = AntiAliasedSnakeBeta(channels, platform=platform)
    apply = jax.jit(module.apply)
    for length in (1, 2, 3, 37, 300):
        x = torch.randn(2, channels, length, generator=gen) * 2.0
        with torch.no_grad():
            ref = hf_act(x).numpy().transpose(0, 2, 1)
        got = np.asarray(apply(params, jnp.asarray(x.numpy().transpose(0, 2, 1))))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=f"length {length}")

    # gradients (the optimization barrier must not get in the way of autodiff)
    x = torch.randn(2, channels, 20, generator=gen, requires_grad=True)
    weights = torch.randn(2, channels, 20, generator=gen)
    (hf_act(x) * weights).sum().backward()
    grads = jax.jit(jax.grad(lambda p, xs: jnp.sum(module.apply(p, xs) * weights.numpy().transpose(0, 2, 1)),
                     argnums=(0, 1)))(params, jnp.asarray(x.detach().numpy().transpose(0, 2, 1)))
    np.testing.assert_allclose(np.asarray(grads[1]), x.grad.numpy().transpose(0, 2, 1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]["params"]["alpha"]), hf_act.act.alpha.grad.numpy(),
                               rtol=1e-5, atol=1e-4)


def test_conv_transpose_matches_torch():
    gen = torch.Generator().manual_seed(2)
    for c_in, c_out, k, r, length in [(6, 3, 11, 5, 4), (4, 2, 7, 3, 9), (4, 2, 4, 2, 1), (3, 5, 5, 2, 6)]:
        torch_conv = torch.nn.ConvTranspose1d(c_in, c_out, k, r, padding=(k - r) // 2)
        x = torch.randn(2, c_in, length, generator=gen)
        with torch.no_grad():
            ref = torch_conv(x).numpy().transpose(0, 2, 1)
        params = {"params": {"kernel": torch_conv.weight.detach().numpy().transpose(2, 0, 1)[::-1],
                             "bias": torch_conv.bias.detach().numpy()}}
        got = ConvTranspose1d(c_in, c_out, k, r).apply(params, jnp.asarray(x.numpy().transpose(0, 2, 1)))
        assert got.shape == ref.shape  # (k - r) odd (the last case) gives r·L + 1, as PyTorch
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- weights


def test_param_tree_and_hf_round_trip(hf_model, ours):
    module, params, _ = ours
    config = BigVGANConfig(**SMALL)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    table = hf_param_table(config)
    assert [row[0] for row in table] == list(state)  # every HF key, in HF order, and nothing else

    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 80, 3)))
    expected = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), nn.meta.unbox(variables))
    got = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), params)
    assert got == expected

    back = params_to_hf(params, config)
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    again = hf_to_params(back, config)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, again, params["params"]))

    broken = dict(state)
    del broken["resblocks.4.convs2.1.weight"]
    broken["ups.0.0.weight"] = broken["ups.0.0.weight"][:, :, :5]
    broken["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"resblocks\.4\.convs2\.1\.weight(.|\n)*extra\.weight(.|\n)*ups\.0\.0"):
        hf_to_params(broken, config)


def test_the_cpu_form_stays_on_the_cpu():
    """The activation's form follows the program's target: the CPU form's optimization barrier and sin^2
    polynomial are absent from a TPU program, whose sines are `sin` ops."""
    x, a = jax.ShapeDtypeStruct((2, 40, 8), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.float32)
    text = {platform: jax.jit(lambda x, a, b, p=platform: anti_aliased_snake_beta(x, a, b, p)).lower(x, a, a)
            .as_text() for platform in ("cpu", "tpu")}
    assert "optimization_barrier" in text["cpu"] and "sine" not in text["cpu"]
    assert "optimization_barrier" not in text["tpu"] and "sine" in text["tpu"]
    assert "feature_group_count = 8" in text["tpu"]  # the FIRs as depthwise convolutions


# ---------------------------------------------------------------------------------------- full model


@pytest.mark.parametrize("frames,platform", [(7, "cpu"), (24, "cpu"), (50, "cpu"), (24, "tpu")])
def test_waveform_matches_hf(hf_model, ours, frames, platform):
    module, params, apply = ours
    if platform != "cpu":  # the TPU program's activation form (depthwise convolutions), run on the CPU devices
        apply = jax.jit(module.clone(platform=platform).apply)
    mel = random_mel(2, frames, seed=frames)
    ref = hf_wave(hf_model, mel)
    got = np.asarray(apply(params, jnp.asarray(mel)))
    assert got.shape == (2, frames * 240) and got.dtype == np.float32
    clamped = np.mean(np.abs(ref) >= 1.0)
    assert clamped < 0.02 and np.std(ref) > 0.05, (clamped, np.std(ref))  # the comparison means something
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


def test_bad_input_shape_is_explained(ours):
    module, params, _ = ours
    with pytest.raises(ValueError, match="mel_dim=80"):
        module.apply(params, jnp.zeros((1, 7, 80)))
