"""Token2Wav flow-matching DiT: the velocity field v(x, t) (HF `Qwen2_5OmniToken2WavDiTModel.forward`), spec §9.2.

    v = DiT(config).apply({"params": params}, x, codes, cond, ref_mel, t, drop_condition=False, apply_cfg=False)

x [B, T, mel] noisy mel, codes [B, T/repeats] int codec ids, cond [B, enc_emb_dim] speaker vector, ref_mel
[B, T_ref, mel] reference mel, t [] or [B] in [0, 1] -> v [B, T, mel] float32 ([2B, T, mel] with apply_cfg).

* `drop_condition` (bool or [B] bool): rows where it is set see the *unconditional* inputs: zeros for cond and
  ref_mel (the zeros still go through ECAPA) and code id 0 (a real embedding row, not a null vector).
* `apply_cfg`: HF's CFG batching. The batch is doubled to [conditional rows; unconditional rows] and the
  output is [2B, T, mel] in that order; one DiT call serves both branches (`flow_matching.sample_mel`).

Pipeline: sinusoidal time embedding of s = 1000·t + MLP -> temb [B, D]; codec embedding repeated ×repeats
along time; ECAPA-TDNN (`ecapa.py`) on ref_mel -> [B, enc_dim]; proj of concat[x, ecapa, code_embed, cond];
`num_hidden_layers` AdaLN-Zero blocks (scanned, see `DiTBlock`); final AdaLN (scale first, then shift); proj_out.

Attention (per layer, `block_attention_mask`): frame i attends frame j iff −back ≤ ⌊j/bs⌋ − ⌊i/bs⌋ ≤ ahead, with
ahead = 1 for layers in look_ahead_layers, back = 1 for layers in look_backward_layers, else 0. RoPE (θ = rope_theta,
positions 0..T−1) is applied to head 0 only, rotating interleaved channel pairs (2i, 2i+1) (spec §9.2.6, §14.7).

The layers differ only in their mask, so they are one `nn.scan` over a stacked param tree; the per-layer
(look_ahead, look_back) pair is a scanned input from which each layer builds its mask.

Param tree (`hf_to_params` / `params_to_hf` convert from / to the HF state_dict keys under
`token2wav.code2wav_dit_model.`; D hidden, L layers, H heads, d head_dim, F = ff_mult·D, E emb_dim, M mel_dim):

    time_embed/time_mlp_0/{kernel [256, D], bias [D]}          time_embed.time_mlp.0.{weight, bias}
    time_embed/time_mlp_2/{kernel [D, D], bias [D]}            time_embed.time_mlp.2.*
    text_embed/codec_embed/embedding [num_embeds + 1, E]       text_embed.codec_embed.weight
    input_embed/proj/{kernel [M + enc_dim + E + enc_emb_dim, D], bias}   input_embed.proj.*
    input_embed/spk_encoder/...                                input_embed.spk_encoder.* (tree in ecapa.py;
                                                               conv kernels [k, in, out], `blocks.0` -> blocks_0)
    transformer_blocks/attn_norm/linear/{kernel [L, D, 6, D], bias [L, 6, D]}
                                                               transformer_blocks.{i}.attn_norm.linear.*
                                                               (6 chunks: shift/scale/gate msa, shift/scale/gate mlp)
    transformer_blocks/attn/to_{q,k,v}/{kernel [L, D, H, d], bias [L, H, d]}   transformer_blocks.{i}.attn.to_q.* ...
    transformer_blocks/attn/to_out_0/{kernel [L, H, d, D], bias [L, D]}       transformer_blocks.{i}.attn.to_out.0.*
    transformer_blocks/ff/ff_0/{kernel [L, D, F], bias [L, F]}                transformer_blocks.{i}.ff.ff.0.*
    transformer_blocks/ff/ff_3/{kernel [L, F, D], bias [L, D]}                transformer_blocks.{i}.ff.ff.3.*
    norm_out/linear/{kernel [D, 2, D], bias [2, D]}            norm_out.linear.* (2 chunks: scale, shift)
    proj_out/{kernel [D, M], bias [M]}                         proj_out.*

HF buffers not in the state_dict (rotary inv_freq) are recomputed here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import REMAT_POLICIES, DiTConfig, RuntimeOptions
from omni_jax.models.attention import attention, bidirectional_mask
from omni_jax.models.ecapa import ECAPATimeDelayNet
from omni_jax.models.layers import Einsum, constrain, default_kernel_init
from omni_jax.models.rotary import inverse_frequencies

__all__ = [
    "DiT", "DiTBlock", "block_attention_mask", "layer_windows", "apply_rope_head0", "rope_angles",
    "timestep_sinusoid", "WeightRow", "weight_table", "hf_to_params", "params_to_hf", "HF_PREFIX",
]

HF_PREFIX = "token2wav.code2wav_dit_model."
TIME_FREQ_DIM = 256  # HF DiTTimestepEmbedding freq_embed_dim
TIME_SCALE = 1000.0  # HF SinusPositionEmbedding scale
LN_EPS = 1e-6

ACT_BATCH, ACT_LENGTH, ACT_EMBED = "activation_batch", "activation_length", "activation_embed"
# Local logical axis names (not in the rule table: replicated).
TIME_FREQ, DIT_INPUT, CODEC_VOCAB, CODEC_EMBED, MEL, CHUNK = (
    "time_freq", "dit_input", "codec_vocab", "codec_embed", "mel", "adaln_chunk")


# ============================================================================================ pieces


def timestep_sinusoid(t: jax.Array, dim: int = TIME_FREQ_DIM, scale: float = TIME_SCALE) -> jax.Array:
    """t [B] -> [B, dim] = [sin(s·f), cos(s·f)], s = scale·t, f_i = exp(−i·ln(10000)/(dim/2 − 1)) (float32 as HF)."""
    half = dim // 2
    exponent = np.float32(-np.log(10000.0) / (half - 1))
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * exponent)  # [half]
    s = (jnp.float32(scale) * t.astype(jnp.float32))[:, None] * freqs[None, :]  # [B, half]
    return jnp.concatenate([jnp.sin(s), jnp.cos(s)], axis=-1)


def rope_angles(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim/2] for positions 0..T−1 (one angle per interleaved channel pair)."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))  # [d/2]
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope_head0(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, d]: rotate head 0's channel pairs (2i, 2i+1) by cos/sin [T, d/2]; heads 1.. unchanged.

    HF de-interleaves head 0 (even channels, then odd) and applies the half-split rotation; it leaves q and k of
    head 0 in that permuted order, which does not change q·k. This is the same rotation without the permutation.
    """
    batch, length, _, head_dim = x.shape
    pairs = x[:, :, 0, :].astype(jnp.float32).reshape(batch, length, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # [B, T, d/2]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(batch, length, head_dim)
    return x.at[:, :, 0, :].set(rotated.astype(x.dtype))


def block_attention_mask(length: int, block_size: int, look_ahead, look_back) -> jax.Array:
    """[T, T] bool: query i may attend key j iff −look_back ≤ ⌊j/bs⌋ − ⌊i/bs⌋ ≤ look_ahead (ints or traced)."""
    block = jnp.arange(length, dtype=jnp.int32) // block_size
    diff = block[None, :] - block[:, None]  # [T(query), S(key)] = block(j) − block(i)
    return (diff >= -jnp.asarray(look_back, jnp.int32)) & (diff <= jnp.asarray(look_ahead, jnp.int32))


def block_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: jax.Array, key_valid: jax.Array, *,
                          block_size: int, max_back: int, max_ahead: int, scale: float) -> jax.Array:
    """The DiT's block-masked attention computed block by block: q, k, v [B, T, H, d] -> [B, T, H, d].

    Query i attends key j iff −window[1] ≤ ⌊j/bs⌋ − ⌊i/bs⌋ ≤ window[0] (`block_attention_mask`) and key_valid[b, j]
    ([B, T] bool: padding / frame mask). window may be traced but must lie within (max_ahead, max_back), the
    static neighbourhood: each query block multiplies only its max_back + 1 + max_ahead neighbour blocks
    (W = 72 keys in the release) instead of all T keys and a [T, T] mask, the same softmax over the same
    allowed keys (masked keys get exactly zero weight in both). Queries with no allowed key (a padded block)
    give 0. Softmax in float32.
    """
    batch, length, heads, head_dim = q.shape
    bs = block_size
    blocks = -(-length // bs)
    pad = blocks * bs - length
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
    # Heads before blocks: the batched matmuls below then need no transposes (3-25x faster on XLA:CPU).
    to_blocks = lambda a: jnp.transpose(a, (0, 2, 1, 3)).reshape(batch, heads, blocks, bs, head_dim)  # noqa: E731
    offsets = range(-max_back, max_ahead + 1)

    def neighbours(a, axis):
        """Blocks along `axis` -> their neighbourhood: block i sees blocks i + o (zeros outside), concatenated on
        the next axis. [.., n, bs, ..] -> [.., n, len(offsets)·bs, ..]"""
        parts = []
        for o in offsets:
            if o == 0:
                parts.append(a)
                continue
            n_fill = min(abs(o), blocks)
            fill = jnp.zeros(a.shape[:axis] + (n_fill,) + a.shape[axis + 1:], a.dtype)
            body = jax.lax.slice_in_dim(a, o, blocks, axis=axis) if o > 0 else jax.lax.slice_in_dim(
                a, 0, max(blocks + o, 0), axis=axis)
            parts.append(jnp.concatenate([body, fill] if o > 0 else [fill, body], axis=axis))
        return jnp.concatenate(parts, axis=axis + 1)

    qb = to_blocks(q)  # [B, H, n, bs, d]
    keys, values = neighbours(to_blocks(k), 2), neighbours(to_blocks(v), 2)  # [B, H, n, W, d]
    valid = neighbours(key_valid.reshape(batch, blocks, bs), 1)  # [B, n, W]
    key_offset = jnp.asarray(np.repeat(np.array(list(offsets), np.int32), bs))  # [W] block offset of each key
    window = jnp.asarray(window, jnp.int32)
    in_window = (key_offset >= -window[1]) & (key_offset <= window[0])  # [W]
    allowed = (valid & in_window[None, None, :])[:, None, :, None, :]  # [B, 1, n, 1, W]

    logits = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, keys, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)  # [B, H, n, bs, W]
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(allowed, probs, 0.0)
    out = jnp.einsum("bhnqk,bhnkd->bhnqd", probs.astype(v.dtype), values, preferred_element_type=jnp.float32)
    out = jnp.transpose(out.reshape(batch, heads, blocks * bs, head_dim), (0, 2, 1, 3))  # [B, T', H, d]
    return out[:, :length].astype(q.dtype)


def layer_windows(config: DiTConfig) -> np.ndarray:
    """[L, 2] int32 (look_ahead, look_back) blocks per layer, as HF (1 if the layer is listed, else 0)."""
    return np.array([[int(i in config.look_ahead_layers), int(i in config.look_backward_layers)]
                     for i in range(config.num_hidden_layers)], np.int32)


def _layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps)


# ============================================================================================ modules


class TimestepEmbedding(nn.Module):
    """t [B] -> temb [B, D]: sinusoid(1000·t) -> time_mlp_0 -> SiLU -> time_mlp_2."""

    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str = "auto"  # the program's target (omni_jax.kernels.target)

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        D = self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        h = timestep_sinusoid(t)  # [B, 256]
        h = Einsum("bf,fd->bd", (TIME_FREQ_DIM, D), (TIME_FREQ, "embed"), (D,), ("embed",), name="time_mlp_0", **kw)(h)
        h = nn.silu(h)
        return Einsum("bd,de->be", (D, D), ("embed", None), (D,), (None,), name="time_mlp_2", **kw)(h)


class CodecEmbedding(nn.Module):
    """codes [B, n] -> [B, n·repeats, E] (each code covers `repeats` frames)."""

    num_embeds: int
    emb_dim: int
    repeats: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        # HF: nn.Embedding(num_embeds + 1, emb_dim)
        table = self.param("embedding", nn.with_logical_partitioning(default_kernel_init, (CODEC_VOCAB, CODEC_EMBED)),
                           (self.num_embeds + 1, self.emb_dim), self.param_dtype)
        embedded = jnp.take(jnp.asarray(table, self.dtype), codes, axis=0)  # [B, n, E]
        return jnp.repeat(embedded, self.repeats, axis=1)


class InputEmbedding(nn.Module):
    """proj(concat[x, ECAPA(ref_mel) over T, code_embed, cond over T]) -> [B, T, D]."""

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str = "auto"

    @nn.compact
    def __call__(self, x, cond, ref_mel, code_embed) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, length, _ = x.shape
        speaker = ECAPATimeDelayNet(cfg, name="spk_encoder", **kw)(ref_mel)  # [B, enc_dim]
        features = jnp.concatenate([
            x.astype(self.dtype),
            jnp.broadcast_to(speaker[:, None, :], (batch, length, cfg.enc_dim)).astype(self.dtype),
            code_embed.astype(self.dtype),
            jnp.broadcast_to(cond[:, None, :], (batch, length, cfg.enc_emb_dim)).astype(self.dtype),
        ], axis=-1)  # [B, T, M + enc_dim + E + enc_emb_dim]
        n_in = cfg.mel_dim + cfg.enc_dim + cfg.emb_dim + cfg.enc_emb_dim
        return Einsum("bti,id->btd", (n_in, cfg.hidden_size), (DIT_INPUT, "embed"), (cfg.hidden_size,), ("embed",),
                      name="proj", platform=self.platform, **kw)(features)


class AdaLayerNormZero(nn.Module):
    """temb [B, D] -> [B, chunks, D] modulation = linear(SiLU(temb)), chunked along axis 1."""

    hidden_size: int
    chunks: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str = "auto"

    @nn.compact
    def __call__(self, temb: jax.Array) -> jax.Array:
        D, C = self.hidden_size, self.chunks
        return Einsum("bd,dce->bce", (D, C, D), ("embed", CHUNK, None), (C, D), (CHUNK, None), name="linear",
                      dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)(
                          nn.silu(temb)).astype(jnp.float32)


class DiTAttention(nn.Module):
    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    platform: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, window, key_valid) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; window [2] = (look_ahead, look_back) blocks; key_valid [B, T] bool."""
        cfg = self.config
        D, H, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)

        def project(name):
            return Einsum("btd,dnh->btnh", (D, H, d), ("embed", "heads", "head_dim"), (H, d), ("heads", "head_dim"),
                          name=name, **kw)(x)

        q, k, v = project("to_q"), project("to_k"), project("to_v")  # [B, T, H, d]
        q, k = apply_rope_head0(q, cos, sin), apply_rope_head0(k, cos, sin)
        q, k, v = (constrain(a, (ACT_BATCH, ACT_LENGTH, "activation_heads", None)) for a in (q, k, v))
        if self.attention_backend == "xla":
            max_ahead, max_back = (int(w.max(initial=0)) for w in layer_windows(cfg).T)
            out = block_local_attention(q, k, v, window, key_valid, block_size=cfg.block_size, max_back=max_back,
                                        max_ahead=max_ahead, scale=d ** -0.5)  # [B, T, H, d]
        else:  # dense [B, T, T] mask for the fused GPU/TPU kernels
            batch, length = key_valid.shape
            allowed = block_attention_mask(length, cfg.block_size, window[0], window[1])  # [T, T]
            mask = bidirectional_mask(key_valid.astype(jnp.int32)).replace(
                allowed=jnp.broadcast_to(allowed[None], (batch, length, length)))
            out = attention(q, k, v, mask, scale=d ** -0.5, backend=self.attention_backend, platform=self.platform)
        return Einsum("btnh,nhd->btd", (H, d, D), ("heads", "head_dim", "embed"), (D,), ("embed",), name="to_out_0",
                      **kw)(out)


class DiTMLP(nn.Module):
    hidden_size: int
    ff_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F = self.hidden_size, self.ff_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        h = Einsum("btd,df->btf", (D, F), ("embed", "mlp"), (F,), ("mlp",), name="ff_0", **kw)(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(self.dtype)  # torch GELU(approximate="tanh")
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, "activation_mlp"))
        return Einsum("btf,fd->btd", (F, D), ("mlp", "embed"), (D,), ("embed",), name="ff_3", **kw)(h)


class DiTBlock(nn.Module):
    """One AdaLN-Zero block; scanned. Carry x [B, T, D]; scanned input window [2] = (look_ahead, look_back)."""

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    platform: str = "auto"

    @nn.compact
    def __call__(self, x, window, temb, cos, sin, key_valid):
        cfg = self.config
        D = cfg.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)

        mod = AdaLayerNormZero(D, 6, name="attn_norm", **kw)(temb)  # [B, 6, D] float32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i, None, :] for i in range(6))

        h = _layer_norm(x) * (1 + scale_msa) + shift_msa
        h = DiTAttention(cfg, attention_backend=self.attention_backend, name="attn", **kw)(
            h.astype(self.dtype), cos, sin, window, key_valid)
        x = x + (gate_msa * h).astype(x.dtype)
        x = constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

        h = _layer_norm(x) * (1 + scale_mlp) + shift_mlp  # ff_norm
        h = DiTMLP(D, cfg.ff_mult * D, name="ff", **kw)(h.astype(self.dtype))
        x = x + (gate_mlp * h).astype(x.dtype)
        return constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED)), None


class DiT(nn.Module):
    """The velocity field; see the module docstring for the call signature and param tree."""

    config: DiTConfig
    options: RuntimeOptions = RuntimeOptions()

    @nn.compact
    def __call__(self, x, codes, cond, ref_mel, t, drop_condition=False, apply_cfg: bool = False,
                 frame_mask=None) -> jax.Array:
        """frame_mask [B, T] (optional; 1 = real frame): padded frames are not attended (streaming.py pads
        chunks into one shape)."""
        cfg = self.config
        dtype, param_dtype = jnp.dtype(self.options.dtype), jnp.dtype(self.options.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        batch, length, mel = x.shape
        _check_inputs(cfg, x, codes, cond, ref_mel)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        drop = jnp.broadcast_to(jnp.asarray(drop_condition, jnp.bool_), (batch,))
        frame_mask = jnp.ones((batch, length), jnp.int32) if frame_mask is None else frame_mask.astype(jnp.int32)
        if apply_cfg:  # [conditional rows; unconditional rows], as HF's apply_cfg
            x, codes, cond, ref_mel, t, frame_mask = (jnp.concatenate([a, a], axis=0)
                                                      for a in (x, codes, cond, ref_mel, t, frame_mask))
            drop = jnp.concatenate([drop, jnp.ones((batch,), jnp.bool_)])
            batch = 2 * batch
        cond = jnp.where(drop[:, None], 0.0, cond.astype(jnp.float32))
        ref_mel = jnp.where(drop[:, None, None], 0.0, ref_mel.astype(jnp.float32))
        codes = jnp.where(drop[:, None], 0, codes.astype(jnp.int32))
        x = constrain(x.astype(jnp.float32), (ACT_BATCH, ACT_LENGTH, None))

        platform = self.options.platform  # the program's target (omni_jax.kernels.target)
        temb = TimestepEmbedding(cfg.hidden_size, name="time_embed", platform=platform, **kw)(t)  # [B, D]
        code_embed = _TextEmbed(cfg, name="text_embed", **kw)(codes)  # [B, T, E]
        h = InputEmbedding(cfg, name="input_embed", platform=platform, **kw)(x, cond, ref_mel, code_embed)  # [B, T, D]
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

        cos, sin = rope_angles(length, cfg.head_dim, cfg.rope_theta)
        key_valid = frame_mask.astype(jnp.bool_)  # [B, T]
        block_cls = DiTBlock
        policy_name = REMAT_POLICIES[self.options.remat_policy]
        if policy_name is not None:
            block_cls = nn.remat(DiTBlock, policy=getattr(jax.checkpoint_policies, policy_name), prevent_cse=False)
        stack = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, attention_backend=self.options.attention_backend, platform=platform, name="transformer_blocks", **kw)
        h, _ = stack(h, jnp.asarray(layer_windows(cfg)), temb, cos, sin, key_valid)

        mod = AdaLayerNormZero(cfg.hidden_size, 2, name="norm_out", platform=platform, **kw)(temb)  # [B, 2, D]
        h = _layer_norm(h) * (1 + mod[:, 0, None, :]) + mod[:, 1, None, :]
        v = Einsum("btd,dm->btm", (cfg.hidden_size, cfg.mel_dim), ("embed", MEL), (cfg.mel_dim,), (MEL,),
                   name="proj_out", platform=platform, **kw)(h.astype(dtype))
        return v.astype(jnp.float32)


class _TextEmbed(nn.Module):
    """HF `DiTCodecEmbedding` (module `text_embed`, child `codec_embed`)."""

    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, codes):
        cfg = self.config
        return CodecEmbedding(cfg.num_embeds, cfg.emb_dim, cfg.repeats, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="codec_embed")(codes)


def _check_inputs(cfg: DiTConfig, x, codes, cond, ref_mel) -> None:
    if x.ndim != 3 or x.shape[-1] != cfg.mel_dim:
        raise ValueError(f"DiT x must be [B, T, mel_dim={cfg.mel_dim}], got shape {tuple(x.shape)}")
    batch, length, _ = x.shape
    if codes.ndim != 2 or codes.shape[0] != batch or codes.shape[1] * cfg.repeats != length:
        raise ValueError(f"DiT codes must be [B={batch}, T/repeats={length / cfg.repeats:g}] for x of {length} "
                         f"frames (repeats={cfg.repeats}), got shape {tuple(codes.shape)}")
    if cond.shape != (batch, cfg.enc_emb_dim):
        raise ValueError(f"DiT cond (speaker vector) must be [B={batch}, enc_emb_dim={cfg.enc_emb_dim}], "
                         f"got shape {tuple(cond.shape)}")
    if ref_mel.ndim != 3 or ref_mel.shape[0] != batch or ref_mel.shape[-1] != cfg.mel_dim:
        raise ValueError(f"DiT ref_mel must be [B={batch}, T_ref, mel_dim={cfg.mel_dim}], "
                         f"got shape {tuple(ref_mel.shape)}")
    if length > cfg.max_position_embeddings:
        raise ValueError(f"mel length {length} exceeds the DiT max_position_embeddings {cfg.max_position_embeddings}")


# ============================================================================================ weights


@dataclasses.dataclass(frozen=True)
class WeightRow:
    """One HF tensor pattern <-> one leaf of our param tree.

    hf: name under `token2wav.code2wav_dit_model.`, with `{i}` for the layer index when `layers` > 0.
    ours: '/'-separated path in the param tree.
    hf_shape: the HF shape of one tensor (one layer).
    kind: layout transform, one of
        identity;  linear [out, in] -> [in, out];  conv1d [out, in, k] -> [k, in, out];
        heads_out [H·d, D] -> [D, H, d];  heads_bias [H·d] -> [H, d];  heads_in [D, H·d] -> [H, d, D];
        chunks_out [n·D, D_in] -> [D_in, n, D];  chunks_bias [n·D] -> [n, D]   (n = `split`, H = `split`)
    layers: number of stacked layers (the leading axis of our leaf), 0 if not stacked.
    split: heads (heads_*) or chunks (chunks_*).
    """

    hf: str
    ours: str
    hf_shape: tuple
    kind: str = "identity"
    layers: int = 0
    split: int = 1

    def hf_names(self) -> list[str]:
        return [self.hf.format(i=i) for i in range(self.layers)] if self.layers else [self.hf]

    def to_ours(self, a: np.ndarray) -> np.ndarray:
        n = self.split
        if self.kind == "identity":
            return a
        if self.kind == "linear":
            return a.T
        if self.kind == "conv1d":
            return a.transpose(2, 1, 0)
        if self.kind == "heads_out":
            return a.T.reshape(a.shape[1], n, a.shape[0] // n)
        if self.kind == "heads_bias" or self.kind == "chunks_bias":
            return a.reshape(n, a.shape[0] // n)
        if self.kind == "heads_in":
            return a.T.reshape(n, a.shape[1] // n, a.shape[0])
        if self.kind == "chunks_out":
            return a.reshape(n, a.shape[0] // n, a.shape[1]).transpose(2, 0, 1)
        raise ValueError(f"unknown weight layout kind {self.kind!r}")

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "identity":
            out = a
        elif self.kind == "linear":
            out = a.T
        elif self.kind == "conv1d":
            out = a.transpose(2, 1, 0)
        elif self.kind == "heads_out":
            out = a.reshape(a.shape[0], -1).T
        elif self.kind in ("heads_bias", "chunks_bias"):
            out = a.reshape(-1)
        elif self.kind == "heads_in":
            out = a.reshape(-1, a.shape[-1]).T
        elif self.kind == "chunks_out":
            out = a.transpose(1, 2, 0).reshape(-1, a.shape[0])
        else:
            raise ValueError(f"unknown weight layout kind {self.kind!r}")
        return np.ascontiguousarray(out)


def _lin(hf, ours, d_in, d_out, layers=0) -> list[WeightRow]:
    return [WeightRow(hf + ".weight", ours + "/kernel", (d_out, d_in), "linear", layers),
            WeightRow(hf + ".bias", ours + "/bias", (d_out,), "identity", layers)]


def _conv(hf, ours, c_in, c_out, k) -> list[WeightRow]:
    return [WeightRow(hf + ".weight", ours + "/kernel", (c_out, c_in, k), "conv1d"),
            WeightRow(hf + ".bias", ours + "/bias", (c_out,))]


def _chunked(hf, ours, d_in, d, n, layers=0) -> list[WeightRow]:
    return [WeightRow(hf + ".weight", ours + "/kernel", (n * d, d_in), "chunks_out", layers, n),
            WeightRow(hf + ".bias", ours + "/bias", (n * d,), "chunks_bias", layers, n)]


def weight_table(config: DiTConfig) -> list[WeightRow]:
    """Every HF DiT state_dict tensor, in HF order, with its place and layout in our tree."""
    c = config
    D, L, H, d, E, M = c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.emb_dim, c.mel_dim
    rows = _lin("time_embed.time_mlp.0", "time_embed/time_mlp_0", TIME_FREQ_DIM, D)
    rows += _lin("time_embed.time_mlp.2", "time_embed/time_mlp_2", D, D)
    rows.append(WeightRow("text_embed.codec_embed.weight", "text_embed/codec_embed/embedding", (c.num_embeds + 1, E)))
    rows += _lin("input_embed.proj", "input_embed/proj", M + c.enc_dim + E + c.enc_emb_dim, D)

    p, o = "input_embed.spk_encoder.", "input_embed/spk_encoder/"
    ch, ks = c.enc_channels, c.enc_kernel_sizes
    rows += _conv(p + "blocks.0.conv", o + "blocks_0/conv", M, ch[0], ks[0])
    for b in range(1, len(ch) - 1):
        bp, bo = f"{p}blocks.{b}.", f"{o}blocks_{b}/"
        rows += _conv(bp + "tdnn1.conv", bo + "tdnn1/conv", ch[b - 1], ch[b], 1)
        width = ch[b] // c.enc_res2net_scale
        for j in range(c.enc_res2net_scale - 1):
            rows += _conv(bp + f"res2net_block.blocks.{j}.conv", bo + f"res2net_block/blocks_{j}/conv", width, width,
                          ks[b])
        rows += _conv(bp + "tdnn2.conv", bo + "tdnn2/conv", ch[b], ch[b], 1)
        rows += _conv(bp + "se_block.conv1", bo + "se_block/conv1", ch[b], c.enc_se_channels, 1)
        rows += _conv(bp + "se_block.conv2", bo + "se_block/conv2", c.enc_se_channels, ch[b], 1)
    C = ch[-1]
    rows += _conv(p + "mfa.conv", o + "mfa/conv", C, C, ks[-1])
    rows += _conv(p + "asp.tdnn.conv", o + "asp/tdnn/conv", 3 * C, c.enc_attention_channels, 1)
    rows += _conv(p + "asp.conv", o + "asp/conv", c.enc_attention_channels, C, 1)
    rows += _conv(p + "fc", o + "fc", 2 * C, c.enc_dim, 1)

    tp, to = "transformer_blocks.{i}.", "transformer_blocks/"
    rows += _chunked(tp + "attn_norm.linear", to + "attn_norm/linear", D, D, 6, L)
    for name in ("to_q", "to_k", "to_v"):
        rows += [WeightRow(tp + f"attn.{name}.weight", to + f"attn/{name}/kernel", (H * d, D), "heads_out", L, H),
                 WeightRow(tp + f"attn.{name}.bias", to + f"attn/{name}/bias", (H * d,), "heads_bias", L, H)]
    rows += [WeightRow(tp + "attn.to_out.0.weight", to + "attn/to_out_0/kernel", (D, H * d), "heads_in", L, H),
             WeightRow(tp + "attn.to_out.0.bias", to + "attn/to_out_0/bias", (D,), "identity", L)]
    F = c.ff_mult * D
    rows += _lin(tp + "ff.ff.0", to + "ff/ff_0", D, F, L)
    rows += _lin(tp + "ff.ff.3", to + "ff/ff_3", F, D, L)
    rows += _chunked("norm_out.linear", "norm_out/linear", D, D, 2)
    rows += _lin("proj_out", "proj_out", D, M)
    return rows


def hf_to_params(state_dict: Mapping[str, Any], config: DiTConfig) -> dict:
    """HF DiT state_dict (keys without `token2wav.code2wav_dit_model.`, or all with it) -> our param tree
    (nested dict of numpy arrays; pass `{"params": tree}` to `DiT.apply`). Raises ValueError listing every
    missing, unexpected and mis-shaped tensor."""
    sd = {k: v for k, v in state_dict.items()}
    if sd and all(k.startswith(HF_PREFIX) for k in sd):
        sd = {k[len(HF_PREFIX):]: v for k, v in sd.items()}
    tree: dict = {}
    missing, mismatched, seen = [], [], set()
    for row in weight_table(config):
        arrays = []
        for name in row.hf_names():
            seen.add(name)
            if name not in sd:
                missing.append(f"{name} {list(row.hf_shape)}")
                continue
            a = _to_numpy(sd[name])
            if tuple(a.shape) != tuple(row.hf_shape):
                mismatched.append(f"{name}: expected {list(row.hf_shape)}, got {list(a.shape)}")
                continue
            arrays.append(row.to_ours(a))
        if len(arrays) != len(row.hf_names()):
            continue
        leaf = np.stack(arrays) if row.layers else arrays[0]
        node = tree
        *parents, last = row.ours.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    unexpected = sorted(set(sd) - seen)
    if missing or mismatched or unexpected:
        lines = [f"DiT state_dict does not match the config: {len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(mismatched)} with the wrong shape"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            lines += [f"{title}: {item}" for item in items[:20]] + ([f"... {len(items) - 20} more"] if len(items) > 20
                                                                   else [])
        raise ValueError("\n".join(lines))
    return tree


def params_to_hf(params: Mapping, config: DiTConfig) -> dict[str, np.ndarray]:
    """Our param tree (or `{"params": tree}`, boxed or not) -> HF DiT state_dict (keys without the prefix)."""
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    out: dict[str, np.ndarray] = {}
    for row in weight_table(config):
        node = params
        for key in row.ours.split("/"):
            if key not in node:
                raise KeyError(f"DiT params have no {row.ours!r} (for HF {row.hf!r})")
            node = node[key]
        leaf = np.asarray(node)
        for i, name in enumerate(row.hf_names()):
            out[name] = row.to_hf(leaf[i] if row.layers else leaf)
    return out


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor (numpy has no bfloat16: widen it)
        value = value.detach().cpu()
        value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)
