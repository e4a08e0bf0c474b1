"""BigVGAN vocoder: natural-log mel [B, mel_dim, T] -> 24 kHz waveform [B, T * 240] (spec §9.4).

HF `Qwen2_5OmniToken2WavBigVGANModel`, computed in float32 (as the reference runs token2wav):

    mel -> amp = exp(mel) -> dB = 20·log10(max(amp, 10^(-115/20))) - 20 -> clamp(2·(dB+115)/115 - 1, -1, 1)
        -> conv_pre (k7)
        -> 6 x [ ConvTranspose1d (stride r, no activation before it) -> mean of 3 AMP blocks (kernels 3, 7, 11) ]
        -> anti-aliased SnakeBeta (activation_post) -> conv_post (k7, no bias) -> clamp(-1, 1)

AMP block: for d in dilations: x = x + conv2(act2(conv1_d(act1(x)))). Every act is an anti-aliased SnakeBeta:
upsample x2 (replicate pad + 12-tap Kaiser-sinc transposed conv) -> SnakeBeta -> downsample x2 (same filter).

Layout: channels last, activations [B, L, C], conv kernels [k, C_in, C_out] (lax "NWC"/"WIO").

Parameter tree (what `hf_to_params` returns; HF names are under `token2wav.code2wav_bigvgan_model.`):

    ours                                          HF                                       layout
    conv_pre/kernel [7, mel_dim, C0]              conv_pre.weight [C0, mel_dim, 7]         Conv1d: w.transpose(2, 1, 0)
    conv_pre/bias [C0]                            conv_pre.bias
    ups_{s}/kernel [k_s, C_s, C_s/2]              ups.{s}.0.weight [C_s, C_s/2, k_s]       ConvTranspose1d, see below
    ups_{s}/bias [C_s/2]                          ups.{s}.0.bias
    resblocks_{j}/convs1_{m}/kernel [k, C, C]     resblocks.{j}.convs1.{m}.weight [C, C, k] Conv1d
    resblocks_{j}/convs1_{m}/bias [C]             resblocks.{j}.convs1.{m}.bias
    resblocks_{j}/convs2_{m}/{kernel, bias}       resblocks.{j}.convs2.{m}.{weight, bias}   Conv1d
    resblocks_{j}/activations_{a}/alpha [C]       resblocks.{j}.activations.{a}.act.alpha  identity (log-scale)
    resblocks_{j}/activations_{a}/beta [C]        resblocks.{j}.activations.{a}.act.beta
    activation_post/{alpha, beta} [C6]            activation_post.act.{alpha, beta}
    conv_post/kernel [7, C6, 1]                   conv_post.weight [1, C6, 7]              Conv1d (no bias)

    with C0 = upsample_initial_channel, C_s = C0 / 2^s, C = C_s / 2 (the channels of stage s's AMP blocks),
    C6 = C0 / 64, j = 3·s + b (stage s, resblock b with k = resblock_kernel_sizes[b]), m < 3 the dilation index inside a block,
    a < 6 (activations a = 0, 2, 4 precede convs1_{a/2}; a = 1, 3, 5 precede convs2_{(a-1)/2}).

ConvTranspose1d layout: PyTorch stores [C_in, C_out, k] and computes out[r·i + j - p] += x[i] · w[:, :, j].
We store the kernel of the equivalent *plain* convolution over the r-dilated input, i.e. the taps flipped:
    ours[j, i, o] = w_torch[i, o, k - 1 - j]          (= w_torch.transpose(2, 0, 1)[::-1])
This is Flax `nn.ConvTranspose`'s layout and `omni_jax.hf_mapping.CONV_TRANSPOSE1D`. The kind of each row
is given by `hf_param_table` ("conv1d", "conv_transpose1d", "identity"), with the same names as the
`hf_mapping` transforms.

The anti-aliasing filters are fixed (not parameters, not in the checkpoint): `kaiser_sinc_filter` recomputes
them in numpy at import time.

Speed. The released dims (upsample_initial_channel 1536, channels 1536 -> 768 -> ... -> 24, rates 5,3,2,2,2,2)
cost about 0.93 GMAC per mel frame, almost all in the AMP-block convs: stage s does C^2 · (3+7+11) · 6 MACs
per output sample (C = its channel count) at 5, 15, 30, 60, 120, 240 samples per frame, i.e. 372, 279, 139,
70, 35, 17 MMAC per frame; the transposed convs add ~16 MMAC. 5 s of speech (500 frames -> 120000 samples) is
~0.47 TMAC (0.93 TFLOP) and ~0.6 G SnakeBeta sines (one per upsampled sample per activation, 109 activations).
Parameters: 115 M (460 MB in float32). Activations are small (at most [B, 120000, 24] float32 per tensor).
Implementation choices (measured with XLA:CPU, 2 cores):
* The anti-aliased activation is done in polyphase form with static shifted slices: the x2 upsample gives
  the even and odd output phases as two 6-tap FIRs of the input, SnakeBeta runs on both phases, and the
  stride-2 downsample is a 6-tap FIR of each phase, summed. Nothing is zero-stuffed and no strided conv runs.
  A depthwise `conv_general_dilated` (feature_group_count=C) was 6-20x slower on XLA:CPU for these shapes.
  An optimization barrier keeps XLA from fusing SnakeBeta into the 12-tap downsample (which would recompute
  each sine 12 times).
* sin^2 is a vectorisable polynomial (`sin_squared`): XLA:CPU's `jnp.sin` is ~20x slower and was ~40% of
  the forward time; with the polynomial a released-size 500-frame forward went from ~22 s to ~10 s.
* The transposed convs use `conv_general_dilated` with `lhs_dilation=r` (as fast as a polyphase rewrite on
  XLA:CPU and simpler); the dilated AMP convs use `rhs_dilation`. The dense convs are the floor that remains.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import BigVGANConfig
from omni_jax.kernels import target
from omni_jax.models.layers import constrain

__all__ = [
    "BigVGAN", "AntiAliasedSnakeBeta", "AMPBlock", "Conv1d", "ConvTranspose1d", "kaiser_sinc_filter",
    "anti_aliased_snake_beta", "sin_squared", "preprocess_mel", "hf_param_table", "hf_to_params", "params_to_hf",
    "HF_PREFIX",
]

HF_PREFIX = "token2wav.code2wav_bigvgan_model."

ACT_BATCH, ACT_LENGTH, ACT_EMBED = "activation_batch", "activation_length", "activation_embed"
# Parameter axis names used only here (not in the sharding rule table, so replicated: 115 M params released).
CONV_WIDTH, CONV_IN, CONV_OUT, CHANNELS = "conv_width", "conv_in", "conv_out", "channels"

SNAKE_EPS = 1e-9  # HF SnakeBeta `no_div_by_zero`
MIN_DB = -115.0  # mel pre-processing floor (dB)
DB_OFFSET = 20.0  # subtracted after amplitude -> dB

Dtype = Any
Array = jax.Array


# ============================================================================================ filters


def kaiser_sinc_filter(cutoff: float = 0.25, half_width: float = 0.3, kernel_size: int = 12) -> np.ndarray:
    """Kaiser-windowed sinc low-pass filter [kernel_size] float32, normalised to sum 1 (HF `kaiser_sinc_filter1d`).

    The released anti-aliasing filter is (0.25, 0.3, 12) for both the x2 upsample and the x2 downsample.
    """
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    if cutoff == 0:
        return np.zeros(kernel_size, np.float32)
    window = np.kaiser(kernel_size, beta)  # symmetric (non-periodic), float64
    if kernel_size % 2 == 0:
        t = np.arange(-half, half) + 0.5
    else:
        t = np.arange(kernel_size) - half
    h = 2 * cutoff * window * np.sinc(2 * cutoff * t)
    return (h / h.sum()).astype(np.float32)


def _polyphase_taps(filt: np.ndarray):
    """Rewrite HF's x2 up/downsample (filter `filt`, even length K) as FIRs on the low-rate phases.

    Up (HF: replicate-pad K/2-1, conv_transpose stride 2, x2, crop): output sample 2n+q (q = 0 even, 1 odd)
    = sum over (o, w) in up[q] of w · x[clip(n + o)].
    Down (HF: replicate-pad (K/2-1, K/2), conv stride 2): y[n] = sum over (o, w) in down[q] of
    w · u[clip(2(n + o) + q)] where u is the upsampled signal (clip = replicate padding at both ends).
    Returns (up, down), each a pair (phase 0, phase 1) of tuples of (offset, weight) with python floats.
    """
    K = len(filt)
    if K % 2:
        raise ValueError(f"the polyphase anti-aliasing filter needs an even number of taps, got {K}")
    pad = K // 2 - 1
    crop_left = pad * 2 + (K - 2) // 2
    up = [[], []]
    for q in (0, 1):
        for j in range(K):
            if (q + crop_left - j) % 2 == 0:
                up[q].append(((q + crop_left - j) // 2 - pad, 2.0 * float(filt[j])))
    down_pad_left = K // 2 - 1
    down = [[], []]
    for j in range(K):
        down[(j - down_pad_left) % 2].append(((j - down_pad_left) // 2, float(filt[j])))
    as_tuple = lambda phases: tuple(tuple(sorted(p)) for p in phases)
    return as_tuple(up), as_tuple(down)


ANTI_ALIAS_FILTER = kaiser_sinc_filter(0.25, 0.3, 12)  # [12] float32
UP_TAPS, DOWN_TAPS = _polyphase_taps(ANTI_ALIAS_FILTER)


def _fir(x: Array, taps, length: int, left: int) -> Array:
    """sum_(o, w) w · x[:, left + o + n] for n < length; x [B, L', C] already padded by `left` rows."""
    out = None
    for offset, weight in taps:
        term = weight * jax.lax.slice_in_dim(x, left + offset, left + offset + length, axis=1)
        out = term if out is None else out + term
    return out


# pi as a sum of three float32s (Cody-Waite): PI_HI has 8 significant bits, so k·PI_HI is exact for |k| < 2^16
_PI_HI = np.float32(3.140625)
_PI_MID = np.float32(np.pi - 3.140625)
_PI_LO = np.float32(np.pi - float(_PI_HI) - float(_PI_MID))
# odd Taylor series of sin(r) = r + r^3·P(r^2): coefficients of P from r^12/13! down to -1/3!
_SIN_COEFFS = tuple(np.float32((-1) ** n / math.factorial(2 * n + 1)) for n in range(6, 0, -1))


def sin_squared(z: Array) -> Array:
    """sin(z)^2 in float32 from adds and multiplies only (within ~2.5e-7 of the exact value for |z| < 2e5).

    XLA:CPU evaluates `jnp.sin` one element at a time (~20x slower than this vectorised polynomial), and the
    SnakeBeta sines were ~40% of a released-size BigVGAN forward on CPU. sin^2 has period pi, so reduce
    r = z - k·pi with k = round(z/pi) (|r| <= pi/2) and evaluate sin(r) by its odd series to r^13
    (truncation < 1e-9). Autodiff sees d/dz = 2 sin(r) cos(r) = sin(2z), as it should (round has zero slope).
    """
    k = jnp.round(z * np.float32(1 / np.pi))
    r = ((z - k * _PI_HI) - k * _PI_MID) - k * _PI_LO
    r2 = r * r
    poly = _SIN_COEFFS[0]
    for coeff in _SIN_COEFFS[1:]:
        poly = poly * r2 + coeff
    sin_r = r + r * r2 * poly
    return sin_r * sin_r


def _snake_beta(x: Array, log_alpha: Array, log_beta: Array, sin_sq=sin_squared) -> Array:
    """SnakeBeta x + sin^2(x·e^alpha) / (e^beta + 1e-9), per channel (the last axis)."""
    alpha = jnp.exp(log_alpha.astype(jnp.float32))
    inv_beta = 1.0 / (jnp.exp(log_beta.astype(jnp.float32)) + SNAKE_EPS)
    return x + inv_beta * sin_sq(x * alpha)


def _fir_depthwise(x: Array, taps, length: int, left: int) -> Array:
    """`_fir` as one depthwise convolution (every channel the same taps): x [B, L', C] -> [B, length, C]."""
    first, last = min(o for o, _ in taps), max(o for o, _ in taps)
    kernel = np.zeros((last - first + 1,), np.float32)
    for offset, weight in taps:
        kernel[offset - first] += weight
    channels = x.shape[2]
    window = jax.lax.slice_in_dim(x, left + first, left + last + length, axis=1)  # [B, length + K - 1, C]
    return jax.lax.conv_general_dilated(
        window, jnp.broadcast_to(jnp.asarray(kernel)[:, None, None], (len(kernel), 1, channels)),
        window_strides=(1,), padding="VALID", dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)


def anti_aliased_snake_beta(x: Array, log_alpha: Array, log_beta: Array, platform: str = "auto") -> Array:
    """HF `Qwen2_5OmniAntiAliasedActivation1d(SnakeBeta)`: up x2 -> SnakeBeta -> down x2. x [B, L, C] float32.

    Both forms compute the same polyphase sums (module docstring). On the CPU (`target.cpu_paths`): static
    shifted slices, the sin^2 polynomial and an optimization barrier, which XLA:CPU runs fastest. Elsewhere:
    each FIR phase one depthwise convolution and `jnp.sin`; the slice form has ~24 slices per activation (2,600
    in the released BigVGAN), which took the TPU compiler 4 minutes for a tiny BigVGAN."""
    cpu = target.cpu_paths(platform)
    fir = _fir if cpu else _fir_depthwise
    sin_sq = sin_squared if cpu else lambda z: jnp.square(jnp.sin(z))
    length = x.shape[1]
    # up x2, as two phases of the upsampled signal u: even = u[2n], odd = u[2n+1]   [B, L, C] each
    lo = -min(o for phase in UP_TAPS for o, _ in phase)
    hi = max(o for phase in UP_TAPS for o, _ in phase)
    x_pad = jnp.pad(x, ((0, 0), (lo, hi), (0, 0)), mode="edge")  # replicate padding
    even = _snake_beta(fir(x_pad, UP_TAPS[0], length, lo), log_alpha, log_beta, sin_sq)
    odd = _snake_beta(fir(x_pad, UP_TAPS[1], length, lo), log_alpha, log_beta, sin_sq)
    # down x2: replicate padding of u means u[0] (= even[0]) before the start and u[2L-1] (= odd[L-1]) after
    # the end, for both phases.
    lo = -min(o for phase in DOWN_TAPS for o, _ in phase)
    hi = max(o for phase in DOWN_TAPS for o, _ in phase)
    first = jnp.broadcast_to(even[:, :1], (x.shape[0], lo, x.shape[2]))
    last = jnp.broadcast_to(odd[:, -1:], (x.shape[0], hi, x.shape[2]))
    even = jnp.concatenate([first, even, last], axis=1)
    odd = jnp.concatenate([first, odd, last], axis=1)
    if cpu:  # materialise the activation once; fused into the 12-tap sum, XLA:CPU would recompute every sin per tap
        even, odd = jax.lax.optimization_barrier((even, odd))
    return fir(even, DOWN_TAPS[0], length, lo) + fir(odd, DOWN_TAPS[1], length, lo)


def preprocess_mel(mel: Array) -> Array:
    """Natural-log mel -> normalised dB in [-1, 1] (HF `process_mel_spectrogram`), any shape, float32."""
    amplitude = jnp.exp(mel.astype(jnp.float32))
    min_level = np.exp(np.float32(MIN_DB / 20.0 * np.log(10)), dtype=np.float32)  # as HF: exp in float32
    db = 20.0 * jnp.log10(jnp.maximum(amplitude, min_level)) - DB_OFFSET
    return jnp.clip(2.0 * ((db - MIN_DB) / -MIN_DB) - 1.0, -1.0, 1.0)


# ============================================================================================ modules


class Conv1d(nn.Module):
    """Stride-1 'same' 1-D conv over [B, L, C_in] with a [k, C_in, C_out] kernel (padding d·(k-1)/2)."""

    in_features: int
    out_features: int
    kernel_size: int
    dilation: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, d = self.kernel_size, self.dilation
        fan_in = self.in_features * k
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5), (CONV_WIDTH, CONV_IN, CONV_OUT)),
            (k, self.in_features, self.out_features),
            self.param_dtype,
        )
        pad = d * (k - 1) // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jnp.asarray(kernel, self.dtype), window_strides=(1,), padding=((pad, pad),),
            rhs_dilation=(d,), dimension_numbers=("NWC", "WIO", "NWC"), precision=self.precision,
            preferred_element_type=jnp.float32,
        )  # [B, L, C_out] float32
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)),
                              (self.out_features,), self.param_dtype)
            y = y + jnp.asarray(bias, jnp.float32)
        return y


class ConvTranspose1d(nn.Module):
    """PyTorch ConvTranspose1d(C_in, C_out, k, stride=r, padding=(k-r)//2): [B, L, C_in] -> [B, r·L, C_out].

    General output length (L-1)·r - 2p + k, which is r·L when k - r is even (all released stages).
    The kernel [k, C_in, C_out] is PyTorch's weight with the taps flipped (module docstring); the op is a plain
    convolution over the r-dilated input padded by k-1-p on both sides.
    """

    in_features: int
    out_features: int
    kernel_size: int
    stride: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, r = self.kernel_size, self.stride
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal((self.in_features * k / r) ** -0.5),
                                         (CONV_WIDTH, CONV_IN, CONV_OUT)),
            (k, self.in_features, self.out_features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)),
                          (self.out_features,), self.param_dtype)
        edge = k - 1 - (k - r) // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jnp.asarray(kernel, self.dtype), window_strides=(1,), padding=((edge, edge),),
            lhs_dilation=(r,), dimension_numbers=("NWC", "WIO", "NWC"), precision=self.precision,
            preferred_element_type=jnp.float32,
        )
        return y + jnp.asarray(bias, jnp.float32)


class AntiAliasedSnakeBeta(nn.Module):
    """Anti-aliased SnakeBeta on [B, L, C]; params alpha, beta [C] hold log values (HF init 0)."""

    channels: int
    param_dtype: Dtype = jnp.float32
    platform: str = "auto"  # the program's target (omni_jax.kernels.target)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (CHANNELS,))
        alpha = self.param("alpha", init, (self.channels,), self.param_dtype)
        beta = self.param("beta", init, (self.channels,), self.param_dtype)
        return anti_aliased_snake_beta(x.astype(jnp.float32), alpha, beta, self.platform)


class AMPBlock(nn.Module):
    """HF `Qwen2_5OmniAMPBlock`: x += conv2(act(conv1_d(act(x)))) for each dilation d. [B, L, C] -> same."""

    channels: int
    kernel_size: int
    dilations: tuple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST
    platform: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        C, k = self.channels, self.kernel_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        for m, d in enumerate(self.dilations):
            h = AntiAliasedSnakeBeta(C, self.param_dtype, self.platform, name=f"activations_{2 * m}")(x)
            h = Conv1d(C, C, k, d, name=f"convs1_{m}", **kw)(h)
            h = AntiAliasedSnakeBeta(C, self.param_dtype, self.platform, name=f"activations_{2 * m + 1}")(h)
            h = Conv1d(C, C, k, 1, name=f"convs2_{m}", **kw)(h)
            x = x + h
        return x


class BigVGAN(nn.Module):
    """mel [B, mel_dim, T] (natural log, as the DiT outputs) -> waveform [B, T·upsample_factor] float32 in [-1, 1].

    `dtype` is the dtype the convolutions read (they accumulate in float32); everything else is float32.
    `precision` is passed to the convolutions (HIGHEST: true float32 on TPU/GPU, as the reference).
    """

    config: BigVGANConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST
    platform: str = "auto"  # the program's target (omni_jax.kernels.target): the activation's form

    @nn.compact
    def __call__(self, mel: Array) -> Array:
        cfg = self.config
        if mel.ndim != 3 or mel.shape[1] != cfg.mel_dim:
            raise ValueError(f"BigVGAN expects a mel spectrogram [batch, mel_dim={cfg.mel_dim}, frames], "
                             f"got shape {tuple(mel.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        act_axes = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)

        x = jnp.swapaxes(preprocess_mel(mel), 1, 2)  # [B, T, mel]
        x = Conv1d(cfg.mel_dim, cfg.upsample_initial_channel, 7, name="conv_pre", **kw)(x)  # [B, T, C0]
        channels = cfg.upsample_initial_channel
        num_kernels = len(cfg.resblock_kernel_sizes)
        for s, (rate, k_up) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            x = ConvTranspose1d(channels, channels // 2, k_up, rate, name=f"ups_{s}", **kw)(x)  # [B, r·L, C/2]
            channels //= 2
            x = constrain(x, act_axes)
            total = None
            for m, (k, dilations) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
                y = AMPBlock(channels, k, tuple(dilations), platform=self.platform,
                             name=f"resblocks_{s * num_kernels + m}", **kw)(x)
                total = y if total is None else total + y
            x = total / num_kernels
        x = AntiAliasedSnakeBeta(channels, self.param_dtype, self.platform, name="activation_post")(x)
        x = Conv1d(channels, 1, 7, use_bias=False, name="conv_post", **kw)(x)  # [B, N, 1]
        return jnp.clip(x[..., 0], -1.0, 1.0)  # [B, N]


# ============================================================================================ HF weights


def hf_param_table(config: BigVGANConfig) -> list[tuple[str, tuple, tuple, str]]:
    """Every HF tensor of `Qwen2_5OmniToken2WavBigVGANModel` (names without `HF_PREFIX`), in state_dict order.

    Rows: (hf_name, our_path (tuple of keys), hf_shape, kind) with kind "conv1d" (torch [out, in, k] ->
    ours [k, in, out]), "conv_transpose1d" (torch [in, out, k] -> ours [k, in, out] with flipped taps) or
    "identity". The kinds are the names of `omni_jax.hf_mapping`'s CONV1D / CONV_TRANSPOSE1D / IDENTITY.
    """
    cfg = config
    rows = []

    def conv(hf, ours, c_in, c_out, k, bias=True):
        rows.append((hf + ".weight", ours + ("kernel",), (c_out, c_in, k), "conv1d"))
        if bias:
            rows.append((hf + ".bias", ours + ("bias",), (c_out,), "identity"))

    def snake(hf, ours, c):
        rows.append((hf + ".act.alpha", ours + ("alpha",), (c,), "identity"))
        rows.append((hf + ".act.beta", ours + ("beta",), (c,), "identity"))

    conv("conv_pre", ("conv_pre",), cfg.mel_dim, cfg.upsample_initial_channel, 7)
    channels = cfg.upsample_initial_channel
    for s, k in enumerate(cfg.upsample_kernel_sizes):
        rows.append((f"ups.{s}.0.weight", (f"ups_{s}", "kernel"), (channels, channels // 2, k), "conv_transpose1d"))
        rows.append((f"ups.{s}.0.bias", (f"ups_{s}", "bias"), (channels // 2,), "identity"))
        channels //= 2
    channels = cfg.upsample_initial_channel
    j = 0
    for _ in cfg.upsample_rates:
        channels //= 2
        for k, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
            block = f"resblocks_{j}"
            for m in range(len(dilations)):
                conv(f"resblocks.{j}.convs1.{m}", (block, f"convs1_{m}"), channels, channels, k)
            for m in range(len(dilations)):
                conv(f"resblocks.{j}.convs2.{m}", (block, f"convs2_{m}"), channels, channels, k)
            for a in range(2 * len(dilations)):
                snake(f"resblocks.{j}.activations.{a}", (block, f"activations_{a}"), channels)
            j += 1
    snake("activation_post", ("activation_post",), channels)
    conv("conv_post", ("conv_post",), channels, 1, 7, bias=False)
    return rows


_TO_OURS = {
    "identity": lambda w: w,
    "conv1d": lambda w: w.transpose(2, 1, 0),
    "conv_transpose1d": lambda w: w.transpose(2, 0, 1)[::-1],
}
_TO_HF = {
    "identity": lambda w: w,
    "conv1d": lambda w: w.transpose(2, 1, 0),
    "conv_transpose1d": lambda w: w[::-1].transpose(1, 2, 0),
}


def hf_to_params(state_dict: Mapping[str, Any], config: BigVGANConfig) -> dict:
    """HF BigVGAN state_dict (names without `HF_PREFIX`; numpy arrays) -> our param tree (nested dict of numpy).

    Returns the tree under "params" (call `module.apply({"params": tree}, mel)`). Raises ValueError naming
    every missing, unexpected and mis-shaped tensor.
    """
    table = hf_param_table(config)
    expected = {name for name, *_ in table}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    wrong = [f"{name}: expected {list(shape)}, got {list(np.shape(state_dict[name]))}"
             for name, _, shape, _ in table if name in state_dict and tuple(np.shape(state_dict[name])) != shape]
    if missing or unexpected or wrong:
        raise ValueError("BigVGAN weights do not match the config:"
                         + (f"\n  missing ({len(missing)}): {missing}" if missing else "")
                         + (f"\n  unexpected ({len(unexpected)}): {unexpected}" if unexpected else "")
                         + (f"\n  wrong shape ({len(wrong)}): {wrong}" if wrong else ""))
    params: dict = {}
    for name, path, _, kind in table:
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(_TO_OURS[kind](np.asarray(state_dict[name])))
    return params


def params_to_hf(params: Mapping[str, Any], config: BigVGANConfig) -> dict[str, np.ndarray]:
    """Our param tree (as `hf_to_params` returns; a {"params": ...} wrapper and Flax boxes are accepted) ->
    HF state_dict names (without `HF_PREFIX`) and layouts, numpy, in HF state_dict order."""
    params = nn.meta.unbox(params)
    if "params" in params and "conv_pre" not in params:
        params = params["params"]
    out = {}
    for name, path, shape, kind in hf_param_table(config):
        node = params
        for key in path:
            if key not in node:
                raise KeyError(f"BigVGAN params have no {'/'.join(path)} (for HF {name})")
            node = node[key]
        w = np.ascontiguousarray(_TO_HF[kind](np.asarray(node)))
        if w.shape != shape:
            raise ValueError(f"BigVGAN param {'/'.join(path)} maps to HF {name} with shape {list(w.shape)}, "
                             f"expected {list(shape)}")
        out[name] = w
    return out
