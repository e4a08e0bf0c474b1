"""ECAPA-TDNN speaker encoder of the Token2Wav DiT (HF `ECAPA_TimeDelayNet`), spec §9.2 step 4.

ref_mel [B, T_ref, mel] -> speaker vector [B, enc_dim]. Time-major (NWC) throughout, so every conv kernel is
[k, C_in, C_out] (HF Conv1d weight [C_out, C_in, k] transposed (2, 1, 0)).

    blocks_0                      Conv(mel -> C0, k0, d0) + ReLU                               (TDNN block)
    blocks_1 .. blocks_{n-2}      SE-Res2Net: tdnn1 (1x1) -> Res2Net (scale s, k_i, d_i) -> tdnn2 (1x1)
                                  -> squeeze-excitation -> + residual
    mfa                           concat(blocks_1 .. blocks_{n-2}) -> Conv(k_{n-1}, d_{n-1}) + ReLU
    asp                           attentive statistics pooling -> [B, 2·C_{n-1}]
    fc                            1x1 conv -> [B, enc_dim]

Every conv pads 'same' in reflect mode (PyTorch padding='same', padding_mode='reflect'): total pad d·(k−1),
left = total // 2, right = the rest. Reflection needs T_ref > the largest one-sided pad (8 in the release).

Param tree (under the DiT's `input_embed/spk_encoder`):

    blocks_0/conv/{kernel [k0, mel, C0], bias [C0]}
    blocks_{b}/tdnn1/conv/{kernel [1, C_{b-1}, C_b], bias}
    blocks_{b}/res2net_block/blocks_{j}/conv/{kernel [k_b, C_b/s, C_b/s], bias}     j < s − 1
    blocks_{b}/tdnn2/conv/{kernel [1, C_b, C_b], bias}
    blocks_{b}/se_block/conv1/{kernel [1, C_b, se], bias}; blocks_{b}/se_block/conv2/{kernel [1, se, C_b], bias}
    mfa/conv/{kernel [k, C, C], bias}                                               C = C_{n-1}
    asp/tdnn/conv/{kernel [1, 3C, att], bias}; asp/conv/{kernel [1, att, C], bias}
    fc/{kernel [1, 2C, enc_dim], bias}
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config import DiTConfig
from omni_jax.models.layers import default_kernel_init

# Local logical axis names (not in the sharding rule table, so ECAPA's small weights stay replicated).
CONV_WIDTH, ECAPA_IN, ECAPA_OUT = "conv_width", "ecapa_in", "ecapa_out"

STATS_EPS = 1e-12  # HF AttentiveStatisticsPooling.eps: std = sqrt(max(var, eps))


def same_reflect_padding(kernel_size: int, dilation: int) -> tuple[int, int]:
    """PyTorch padding='same': total d·(k−1), the left side gets the floor half."""
    total = dilation * (kernel_size - 1)
    return total // 2, total - total // 2


class Conv1d(nn.Module):
    """Conv over [B, T, C_in] -> [B, T, C_out], kernel [k, C_in, C_out], 'same' reflect padding, bias."""

    in_features: int
    out_features: int
    kernel_size: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel",
                            nn.with_logical_partitioning(default_kernel_init, (CONV_WIDTH, ECAPA_IN, ECAPA_OUT)),
                            (self.kernel_size, self.in_features, self.out_features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (ECAPA_OUT,)),
                          (self.out_features,), self.param_dtype)
        left, right = same_reflect_padding(self.kernel_size, self.dilation)
        if left or right:
            if x.shape[1] <= max(left, right):
                raise ValueError(f"ECAPA reflect padding of {max(left, right)} frames needs a reference mel longer "
                                 f"than that; got {x.shape[1]} frames")
            x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
            window_strides=(1,), padding="VALID", rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"), preferred_element_type=jnp.float32,
        )
        return (y + jnp.asarray(bias, jnp.float32)).astype(self.dtype)


class TimeDelayNetBlock(nn.Module):
    """Conv + ReLU (HF `TimeDelayNetBlock`; the conv is the child `conv`)."""

    in_features: int
    out_features: int
    kernel_size: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = Conv1d(self.in_features, self.out_features, self.kernel_size, self.dilation,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        return jax.nn.relu(conv(x))


class Res2NetBlock(nn.Module):
    """Split channels into `scale` parts; part 0 passes, part 1 -> tdnn_0, part i -> tdnn_{i-1}(part_i + out_{i-1})."""

    channels: int
    scale: int
    kernel_size: int
    dilation: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.channels % self.scale:
            raise ValueError(f"Res2Net channels {self.channels} not divisible by enc_res2net_scale {self.scale}")
        width = self.channels // self.scale
        parts = jnp.split(x, self.scale, axis=-1)  # scale x [B, T, width]
        outputs = [parts[0]]
        previous = None
        for i in range(1, self.scale):
            block = TimeDelayNetBlock(width, width, self.kernel_size, self.dilation, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=f"blocks_{i - 1}")
            previous = block(parts[i] if i == 1 else parts[i] + previous)
            outputs.append(previous)
        return jnp.concatenate(outputs, axis=-1)


class SqueezeExcitationBlock(nn.Module):
    """x · sigmoid(conv2(relu(conv1(mean_t x)))) (1x1 convs)."""

    channels: int
    se_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(self.dtype)  # [B, 1, C]
        s = jax.nn.relu(Conv1d(self.channels, self.se_channels, name="conv1", **kw)(s))
        s = jax.nn.sigmoid(Conv1d(self.se_channels, self.channels, name="conv2", **kw)(s))
        return x * s


class SqueezeExcitationRes2NetBlock(nn.Module):
    in_features: int
    out_features: int
    res2net_scale: int
    se_channels: int
    kernel_size: int
    dilation: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.in_features != self.out_features:
            raise ValueError(f"SE-Res2Net residual needs equal channels, got {self.in_features} -> "
                             f"{self.out_features} (enc_channels)")
        h = TimeDelayNetBlock(self.in_features, self.out_features, name="tdnn1", **kw)(x)
        h = Res2NetBlock(self.out_features, self.res2net_scale, self.kernel_size, self.dilation,
                         name="res2net_block", **kw)(h)
        h = TimeDelayNetBlock(self.out_features, self.out_features, name="tdnn2", **kw)(h)
        h = SqueezeExcitationBlock(self.out_features, self.se_channels, name="se_block", **kw)(h)
        return h + x


def _weighted_statistics(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, C], weights [B, T, C] or [B, T, 1] summing to 1 over T -> mean, std [B, C] (HF eps handling)."""
    mean = jnp.sum(weights * x, axis=1)
    var = jnp.sum(weights * jnp.square(x - mean[:, None, :]), axis=1)
    return mean, jnp.sqrt(jnp.maximum(var, STATS_EPS))


class AttentiveStatisticsPooling(nn.Module):
    """[B, T, C] -> [B, 2C]: attention over time conditioned on the global mean/std, then weighted mean/std."""

    channels: int
    attention_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(jnp.float32)
        length = x.shape[1]
        # HF builds a length mask of ones and divides by its sum: uniform weights 1/T.
        uniform = jnp.full((1, length, 1), 1.0, jnp.float32) / jnp.float32(length)
        mean, std = _weighted_statistics(x, uniform)  # [B, C] each
        context = jnp.concatenate(
            [x, jnp.broadcast_to(mean[:, None], x.shape), jnp.broadcast_to(std[:, None], x.shape)], axis=-1)
        a = TimeDelayNetBlock(3 * self.channels, self.attention_channels, name="tdnn", **kw)(context.astype(self.dtype))
        a = Conv1d(self.attention_channels, self.channels, name="conv", **kw)(jnp.tanh(a))  # [B, T, C]
        a = jax.nn.softmax(a.astype(jnp.float32), axis=1)
        mean, std = _weighted_statistics(x, a)
        return jnp.concatenate([mean, std], axis=-1).astype(self.dtype)  # [B, 2C]


class ECAPATimeDelayNet(nn.Module):
    """ref_mel [B, T_ref, mel] -> [B, enc_dim]."""

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ref_mel: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels, kernels, dilations = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if ref_mel.shape[-1] != cfg.mel_dim:
            raise ValueError(f"ref_mel has {ref_mel.shape[-1]} mel bins; the DiT config expects {cfg.mel_dim}")
        h = TimeDelayNetBlock(cfg.mel_dim, channels[0], kernels[0], dilations[0], name="blocks_0", **kw)(
            ref_mel.astype(self.dtype))
        features = []
        for i in range(1, len(channels) - 1):
            h = SqueezeExcitationRes2NetBlock(channels[i - 1], channels[i], cfg.enc_res2net_scale,
                                              cfg.enc_se_channels, kernels[i], dilations[i],
                                              name=f"blocks_{i}", **kw)(h)
            features.append(h)
        h = jnp.concatenate(features, axis=-1)  # [B, T, Σ C_i]
        if h.shape[-1] != channels[-1]:
            raise ValueError(f"ECAPA MFA input has {h.shape[-1]} channels (sum of enc_channels[1:-1]); "
                             f"enc_channels[-1] = {channels[-1]} must equal it")
        h = TimeDelayNetBlock(channels[-1], channels[-1], kernels[-1], dilations[-1], name="mfa", **kw)(h)
        pooled = AttentiveStatisticsPooling(channels[-1], cfg.enc_attention_channels, name="asp", **kw)(h)
        out = Conv1d(2 * channels[-1], cfg.enc_dim, name="fc", **kw)(pooled[:, None, :])  # [B, 1, enc_dim]
        return out[:, 0]
