"""The thinker's Whisper-like audio encoder (HF `Qwen2_5OmniAudioEncoder`), spec §4.

Two halves:

* `plan_audio_chunks` (host, numpy): cut every clip's *valid* mel frames into chunks of 2·n_window = 200 frames
  (2 s), the last chunk of a clip holding the remainder, and stack them into a fixed-width array
  [C, n_mels, 200]. The zero padding the feature extractor adds up to 300 s is dropped here and never computed on.
  The chunk count can be rounded up to a bucket (padding chunks of length 0) so that jit sees few shapes.
* `AudioEncoder` (Flax): every chunk is one row of the batch. conv stem -> sinusoid positions (restarting per
  chunk) -> pre-LN transformer layers with attention inside each chunk only -> average pooling of frame pairs
  -> ln_post -> proj. Returns fixed-shape tokens [C, P, output_dim] plus a validity mask; `gather_audio_tokens`
  flattens the valid ones into HF's order ([Σ n_tok, output_dim], sample-major, time-ordered).

Why per-chunk pooling equals HF's per-sample pooling: a full chunk has 2·n_window frames, hence n_window frames
after the stride-2 conv, an even number when n_window is even (100 in the release). Frame pairs (2k, 2k+1)
counted from the sample start therefore never straddle two chunks, and only a sample's last chunk can have an
odd frame, which HF drops too. `plan_audio_chunks` rejects an odd n_window.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import REMAT_POLICIES, AudioEncoderConfig, RuntimeOptions
from omni_jax.models.attention import AttentionMask, attention, bidirectional_mask
from omni_jax.models.layers import Einsum, constrain, default_kernel_init

ACT_BATCH, ACT_LENGTH, ACT_EMBED = "activation_batch", "activation_length", "activation_embed"

# Logical axis names used only here. They are not in the sharding rule table, so they stay replicated.
CONV_WIDTH = "conv_width"  # the 3 taps of a conv kernel
MEL = "mel"  # conv1 input channels (n_mel_bins)
CONV_IN = "conv_in"  # conv2 input channels (d_model; "embed" is taken by the output channels)
AUDIO_OUT = "audio_out"  # proj output = the thinker's hidden size
AUDIO_SPECIAL = "audio_special"  # the 2 rows of audio_bos_eos_token


# ------------------------------------------------------------------------------------------ host side


@dataclasses.dataclass(frozen=True)
class AudioChunks:
    """The encoder's input for a batch of clips (numpy, host side)."""

    chunks: np.ndarray  # [C, n_mels, 2*n_window] float32, right-padded with zeros
    chunk_lengths: np.ndarray  # [C] int32 valid frames per chunk; 0 for bucket-padding chunks
    chunk_sample: np.ndarray  # [C] int32 owning batch index; -1 for bucket-padding chunks
    tokens_per_sample: np.ndarray  # [B] int32 LM audio tokens per clip (spec §3.2.7)

    @property
    def num_chunks(self) -> int:
        return int(self.chunks.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens_per_sample.sum())


def audio_output_lengths(feature_lengths) -> tuple[np.ndarray, np.ndarray]:
    """Valid mel frames F -> (frames after the stride-2 conv F1 = ⌊(F−1)/2⌋+1, LM tokens ⌊(F1−2)/2⌋+1)."""
    frames = np.asarray(feature_lengths, dtype=np.int64)
    after_conv = (frames - 1) // 2 + 1
    tokens = (after_conv - 2) // 2 + 1
    return after_conv.astype(np.int32), tokens.astype(np.int32)


def plan_audio_chunks(
    input_features,  # [B, n_mels, T_pad] (HF `input_features`)
    feature_attention_mask,  # [B, T_pad] 1 = valid frame (HF `feature_attention_mask`)
    chunk_bucket: Optional[int] = None,
    *,
    n_window: int = 100,
) -> AudioChunks:
    """Cut each clip's valid frames into 2·n_window-frame chunks (spec §4 step 1), in sample-major order.

    Valid frames are the ones the mask marks (as HF's `get_audio_features` selects them). With `chunk_bucket`,
    the chunk count is rounded up to a multiple of it with empty chunks (length 0, sample -1), which produce no
    tokens. Raises ValueError for a clip with no valid frame, naming its batch index.
    """
    features = np.asarray(input_features)
    mask = np.asarray(feature_attention_mask)
    if features.ndim != 3:
        raise ValueError(f"input_features must be [batch, n_mels, frames], got shape {features.shape}")
    if mask.shape != (features.shape[0], features.shape[2]):
        raise ValueError(f"feature_attention_mask has shape {mask.shape}; expected [batch, frames] = "
                         f"{(features.shape[0], features.shape[2])} to match input_features {features.shape}")
    if n_window <= 0 or n_window % 2:
        raise ValueError(f"n_window must be a positive even number (a full chunk's {n_window} post-conv frames "
                         "must pair up for pooling); the release uses 100")
    if chunk_bucket is not None and chunk_bucket < 1:
        raise ValueError(f"chunk_bucket must be >= 1 or None, got {chunk_bucket}")

    batch, n_mels, _ = features.shape
    width = 2 * n_window
    valid = mask.astype(bool)
    feature_lengths = valid.sum(axis=1)  # [B]
    for b, length in enumerate(feature_lengths):
        if length == 0:
            raise ValueError(f"audio sample {b} has no valid frames (feature_attention_mask is all zero); "
                             "drop it or give it at least one frame")

    per_sample = (feature_lengths + width - 1) // width  # [B] chunks per clip
    num_real = int(per_sample.sum())
    num_chunks = num_real if chunk_bucket is None else -(-num_real // chunk_bucket) * chunk_bucket

    chunks = np.zeros((num_chunks, n_mels, width), np.float32)
    chunk_lengths = np.zeros((num_chunks,), np.int32)
    chunk_sample = np.full((num_chunks,), -1, np.int32)
    c = 0
    for b in range(batch):
        frames = features[b][:, valid[b]]  # [n_mels, F_b]: only the valid frames
        for start in range(0, frames.shape[1], width):
            piece = frames[:, start:start + width]
            chunks[c, :, :piece.shape[1]] = piece
            chunk_lengths[c] = piece.shape[1]
            chunk_sample[c] = b
            c += 1
    _, tokens_per_sample = audio_output_lengths(feature_lengths)
    return AudioChunks(chunks, chunk_lengths, chunk_sample, tokens_per_sample)


def gather_audio_tokens(tokens: jax.Array, token_mask: jax.Array, size: Optional[int] = None) -> jax.Array:
    """[C, P, D] tokens + [C, P] mask -> the valid tokens [N, D] in chunk-major order.

    This is HF's `get_audio_features` order (sample-major, time-ordered), since chunks are laid out sample by
    sample. Without `size` the mask must be concrete (not under jit). With a static `size` it is jit-safe: the
    first `size` valid tokens, followed by zero rows if there are fewer.
    """
    flat = tokens.reshape(-1, tokens.shape[-1])  # [C*P, D]
    flat_mask = token_mask.reshape(-1)
    if size is None:
        return flat[np.asarray(flat_mask)]
    (index,) = jnp.nonzero(flat_mask, size=size, fill_value=0)
    count = jnp.sum(flat_mask)
    rows = jnp.take(flat, index, axis=0)
    return jnp.where((jnp.arange(size) < count)[:, None], rows, jnp.zeros((), rows.dtype))


# ------------------------------------------------------------------------------------------ model


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed position table [length, channels]: sin half, then cos half (spec §4 step 3).

    Computed in float32 the way HF does, so the constant matches its (non-persistent) buffer.
    """
    if channels % 2:
        raise ValueError(f"the sinusoid position table needs an even channel count, got {channels}")
    half = channels // 2
    increment = np.log(max_timescale) / (half - 1)
    # float32 arguments as in the reference; the transcendental functions run in float64 and are rounded once,
    # because numpy's float32 sin/cos/exp are less accurate than torch's.
    exponent = np.float32(-increment) * np.arange(half, dtype=np.float32)  # [half] float32
    inv_timescales = np.exp(exponent.astype(np.float64)).astype(np.float32)
    scaled = (np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]).astype(np.float64)
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)  # [length, channels]


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)  # HF "gelu" = exact erf form


class LayerNorm(nn.Module):
    """LayerNorm with affine scale/bias, computed in float32, returned in `dtype`."""

    dim: int
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (self.dim,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                          (self.dim,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        return (y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)).astype(self.dtype)


class Conv1d(nn.Module):
    """1-D convolution over [N, W, C_in] with a [k, C_in, C_out] kernel, symmetric zero padding, and a bias."""

    in_features: int
    out_features: int
    kernel_size: int
    stride: int
    padding: int
    in_axis: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(default_kernel_init, (CONV_WIDTH, self.in_axis, "embed")),
            (self.kernel_size, self.in_features, self.out_features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                          (self.out_features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            jnp.asarray(kernel, self.dtype),
            window_strides=(self.stride,),
            padding=((self.padding, self.padding),),
            dimension_numbers=("NWC", "WIO", "NWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + jnp.asarray(bias, jnp.float32)).astype(self.dtype)


class AudioAttention(nn.Module):
    """Bidirectional MHA inside each chunk; q/v/out projections have biases, k has none; no RoPE."""

    d_model: int
    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    platform: str = "auto"  # the program's target (omni_jax.kernels.target)

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask) -> jax.Array:
        """x [C, L, D] -> [C, L, D]."""
        D, H, d = self.d_model, self.num_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        q = Einsum("cld,dnh->clnh", (D, H, d), ("embed", "heads", "head_dim"), (H, d), ("heads", "head_dim"),
                   name="q_proj", **kw)(x)
        k = Einsum("cld,dnh->clnh", (D, H, d), ("embed", "heads", "head_dim"), name="k_proj", **kw)(x)
        v = Einsum("cld,dnh->clnh", (D, H, d), ("embed", "heads", "head_dim"), (H, d), ("heads", "head_dim"),
                   name="v_proj", **kw)(x)
        q, k, v = (constrain(t, (ACT_BATCH, ACT_LENGTH, "activation_heads", None)) for t in (q, k, v))
        out = attention(q, k, v, mask, scale=d**-0.5, backend=self.attention_backend,
                        platform=self.platform)  # [C, L, H, d]
        return Einsum("clnh,nhd->cld", (H, d, D), ("heads", "head_dim", "embed"), (D,), ("embed",),
                      name="out_proj", **kw)(out)


class AudioEncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + fc2(GELU(fc1(LN(x))))."""

    d_model: int
    ffn_dim: int
    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    platform: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask):
        """x [C, L, D] -> (x, None) (scan carry)."""
        D, F = self.d_model, self.ffn_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(D, 1e-5, name="self_attn_layer_norm", **kw)(x)
        h = AudioAttention(D, self.num_heads, self.head_dim, attention_backend=self.attention_backend,
                           platform=self.platform, name="self_attn", **kw)(h, mask)
        x = constrain(x + h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        h = LayerNorm(D, 1e-5, name="final_layer_norm", **kw)(x)
        h = Einsum("cld,df->clf", (D, F), ("embed", "mlp"), (F,), ("mlp",), name="fc1", platform=self.platform,
                   **kw)(h)
        h = constrain(_gelu(h), (ACT_BATCH, ACT_LENGTH, "activation_mlp"))  # [C, L, F]
        h = Einsum("clf,fd->cld", (F, D), ("mlp", "embed"), (D,), ("embed",), name="fc2", platform=self.platform,
                   **kw)(h)
        x = constrain(x + h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        return x, None


class _UnusedTable(nn.Module):
    """A [rows, features] `embedding` parameter that nothing reads (HF's `audio_bos_eos_token`)."""

    rows: int
    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.with_logical_partitioning(default_kernel_init, (AUDIO_SPECIAL, AUDIO_OUT)),
                          (self.rows, self.features), self.param_dtype)


class AudioEncoder(nn.Module):
    """chunks [C, n_mels, W] + chunk_lengths [C] -> (tokens [C, P, output_dim], token_mask [C, P] bool).

    W = 2·n_window for chunks from `plan_audio_chunks` (any W ≤ 2·n_window works); L = ⌊(W−1)/2⌋+1 frames
    after the conv stem and P = ⌊L/2⌋ pooled tokens per chunk (50 for the release's 200-frame chunks).
    """

    config: AudioEncoderConfig
    options: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, chunks: jax.Array, chunk_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(self.options.dtype), jnp.dtype(self.options.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        num_chunks, n_mels, width = chunks.shape
        if n_mels != cfg.num_mel_bins:
            raise ValueError(f"audio chunks have {n_mels} mel bins; the config expects {cfg.num_mel_bins}")
        D = cfg.d_model
        length = (width - 1) // 2 + 1  # frames after the stride-2 conv
        if length > cfg.max_source_positions:
            raise ValueError(f"audio chunks of {width} frames give {length} positions, more than "
                             f"max_source_positions = {cfg.max_source_positions}")
        pooled = length // 2

        # Declared so checkpoints round trip; the reference never uses it in the forward pass.
        _UnusedTable(2, cfg.output_dim, param_dtype, name="audio_bos_eos_token")()

        chunk_lengths = chunk_lengths.astype(jnp.int32)
        frame_valid = jnp.arange(width, dtype=jnp.int32)[None, :] < chunk_lengths[:, None]  # [C, W]
        x = jnp.transpose(chunks, (0, 2, 1)).astype(dtype)  # [C, W, n_mels]
        x = constrain(x, (ACT_BATCH, ACT_LENGTH, None))
        h = _gelu(Conv1d(n_mels, D, 3, 1, 1, MEL, name="conv1", **kw)(x))  # [C, W, D]
        h = h * frame_valid[:, :, None].astype(dtype)
        h = _gelu(Conv1d(D, D, 3, 2, 1, CONV_IN, name="conv2", **kw)(h))  # [C, L, D]
        h = h + jnp.asarray(sinusoid_table(length, D), dtype)[None]  # positions restart in every chunk
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

        valid_frames = (chunk_lengths - 1) // 2 + 1  # [C] frames after the conv (0 for empty chunks)
        segment_ids = (jnp.arange(length, dtype=jnp.int32)[None, :] < valid_frames[:, None]).astype(jnp.int32)
        mask = bidirectional_mask(segment_ids)  # each chunk (row) attends to its own valid frames only

        layer_cls = AudioEncoderLayer
        policy_name = REMAT_POLICIES[self.options.remat_policy]
        if policy_name is not None:
            layer_cls = nn.remat(AudioEncoderLayer, policy=getattr(jax.checkpoint_policies, policy_name),
                                 prevent_cse=False)
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=cfg.encoder_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            d_model=D, ffn_dim=cfg.encoder_ffn_dim, num_heads=cfg.encoder_attention_heads,
            head_dim=cfg.head_dim, attention_backend=self.options.attention_backend, platform=self.options.platform,
            name="layers", **kw,
        )
        h, _ = stack(h, mask)  # [C, L, D]

        # Average frame pairs (2k, 2k+1) inside each chunk; an odd last frame is dropped.
        pairs = h[:, : 2 * pooled].astype(jnp.float32).reshape(num_chunks, pooled, 2, D)
        h = ((pairs[:, :, 0] + pairs[:, :, 1]) / 2).astype(dtype)  # [C, P, D]
        h = LayerNorm(D, 1e-5, name="ln_post", **kw)(h)
        tokens = Einsum("cpd,do->cpo", (D, cfg.output_dim), ("embed", AUDIO_OUT), (cfg.output_dim,), (AUDIO_OUT,),
                        name="proj", platform=self.options.platform, **kw)(h)  # [C, P, output_dim]
        tokens = constrain(tokens, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        token_mask = jnp.arange(pooled, dtype=jnp.int32)[None, :] < (valid_frames // 2)[:, None]  # [C, P]
        return tokens, token_mask
