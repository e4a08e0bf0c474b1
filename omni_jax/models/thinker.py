"""The Thinker: token embeddings, the Qwen2.5 decoder stack and the untied lm_head.

The multimodal encoders (audio tower, visual) run first and their outputs overwrite the embeddings at the
placeholder positions; `__call__` takes token ids (+ encoder inputs) or ready input embeddings.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.models.audio_encoder import AudioEncoder, gather_audio_tokens
from omni_jax.models.kv_cache import KVCache
from omni_jax.models.layers import Einsum, Embed, constrain
from omni_jax.models.text_decoder import TextDecoder
from omni_jax.models.vision_encoder import VisionEncoder, VisionPlanArrays


@flax.struct.dataclass
class MultimodalAudio:
    """Audio encoder input (see `audio_encoder.plan_audio_chunks`)."""

    chunks: jax.Array  # [C, n_mels, 200]
    chunk_lengths: jax.Array  # [C]
    num_tokens: int = flax.struct.field(pytree_node=False)  # static bound on the LM audio tokens (>= real count)


@flax.struct.dataclass
class MultimodalVision:
    """Vision encoder input for the images (or the videos) of a batch (see `vision_encoder.plan_vision`)."""

    pixel_values: jax.Array  # [N_pad, C*T*P*P], bucket padding last
    plan: VisionPlanArrays


def scatter_placeholders(embeds: jax.Array, input_ids: jax.Array, token_id: int, features: jax.Array) -> jax.Array:
    """Overwrite the embeddings at `token_id` positions with `features` in row-major order.

    embeds [B, T, D], input_ids [B, T], features [N, D] with N >= number of placeholders (extra rows unused;
    the host checks the counts match before calling).
    """
    batch, length, dim = embeds.shape
    is_placeholder = (input_ids == token_id).reshape(-1)  # [B*T]
    index = jnp.clip(jnp.cumsum(is_placeholder) - 1, 0, features.shape[0] - 1)  # k-th placeholder -> row k
    gathered = jnp.take(features.astype(embeds.dtype), index, axis=0).reshape(batch, length, dim)
    return jnp.where(is_placeholder.reshape(batch, length, 1), gathered, embeds)


@flax.struct.dataclass
class ThinkerOutput:
    logits: jax.Array  # [B, T or 1, V] float32
    hidden_states: jax.Array  # [B, T, D] post-final-norm (what the talker consumes)
    cache: Optional[KVCache]
    inputs_embeds: jax.Array  # [B, T, D] decoder input: token embeddings with the encoder outputs merged in


class Thinker(nn.Module):
    config: Any  # omni_jax.config.ThinkerConfig
    options: Any  # omni_jax.config.RuntimeOptions

    def setup(self):
        text = self.config.text
        dtype, param_dtype = jnp.dtype(self.options.dtype), jnp.dtype(self.options.param_dtype)
        platform = self.options.platform  # the program's target (omni_jax.kernels.target)
        self.embed_tokens = Embed(text.vocab_size, text.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  platform=platform)
        self.decoder = TextDecoder(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=text.head_dim,
            rms_norm_eps=text.rms_norm_eps,
            rope_theta=text.rope_theta,
            mrope_section=tuple(text.mrope_section),
            dtype=dtype,
            param_dtype=param_dtype,
            attention_backend=self.options.attention_backend,
            remat_policy=self.options.remat_policy,
            scan_layers=self.options.scan_layers,
            platform=platform,
        )
        self.lm_head = Einsum("btd,dv->btv", (text.hidden_size, text.vocab_size), ("embed", "vocab"),
                              dtype=dtype, param_dtype=param_dtype, platform=platform)
        self.audio_tower = AudioEncoder(self.config.audio, self.options)
        self.visual = VisionEncoder(self.config.vision, self.options)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D] embeddings."""
        return self.embed_tokens(input_ids)

    def embed_multimodal(
        self,
        input_ids: jax.Array,  # [B, T]
        audio: Optional[MultimodalAudio] = None,
        image: Optional[MultimodalVision] = None,
        video: Optional[MultimodalVision] = None,
    ) -> jax.Array:
        """Token embeddings with encoder outputs written over the placeholder positions (audio, then image,
        then video), each modality's features filling its placeholders in row-major order. [B, T, D]."""
        embeds = self.embed(input_ids)
        cfg = self.config
        if audio is not None:
            tokens, token_mask = self.audio_tower(audio.chunks, audio.chunk_lengths)  # [C, P, D], [C, P]
            features = gather_audio_tokens(tokens, token_mask, size=audio.num_tokens)  # [N, D]
            embeds = scatter_placeholders(embeds, input_ids, cfg.audio_token_index, features)
        if image is not None:
            features = self.visual(image.pixel_values, image.plan)  # [N_pad / 4, D], padding rows last
            embeds = scatter_placeholders(embeds, input_ids, cfg.image_token_index, features)
        if video is not None:
            features = self.visual(video.pixel_values, video.plan)
            embeds = scatter_placeholders(embeds, input_ids, cfg.video_token_index, features)
        return embeds

    def __call__(
        self,
        input_ids: Optional[jax.Array],  # [B, T] int32
        positions: jax.Array,  # [3, B, T] TMRoPE positions
        segment_ids: jax.Array,  # [B, T] int32, 0 = padding
        cache: Optional[KVCache] = None,
        inputs_embeds: Optional[jax.Array] = None,  # [B, T, D] instead of embedding input_ids
        last_logits_only: bool = False,
        audio: Optional[MultimodalAudio] = None,
        image: Optional[MultimodalVision] = None,
        video: Optional[MultimodalVision] = None,
        logits_at: Optional[jax.Array] = None,  # [B] int32: logits of that token only (else of all, or the last)
    ) -> ThinkerOutput:
        if inputs_embeds is None:
            inputs_embeds = self.embed_multimodal(input_ids, audio, image, video)
        hidden, cache = self.decoder(inputs_embeds, positions, segment_ids, cache)
        if logits_at is not None:
            head_in = jnp.take_along_axis(hidden, logits_at.astype(jnp.int32)[:, None, None], axis=1)  # [B, 1, D]
        else:
            head_in = hidden[:, -1:, :] if last_logits_only else hidden
        logits = self.lm_head(head_in).astype(jnp.float32)  # [B, T, V]
        logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return ThinkerOutput(logits=logits, hidden_states=hidden, cache=cache, inputs_embeds=inputs_embeds)


def init_thinker(thinker: Thinker, rng: jax.Array) -> dict:
    """Variables of every Thinker part (LM, audio tower, visual), from tiny dummy inputs (jit/eval_shape-able)."""
    import numpy as np

    from omni_jax.models.vision_encoder import plan_vision

    cfg = thinker.config
    merge = cfg.vision.spatial_merge_size
    plan = plan_vision(np.array([[1, merge, merge]]), cfg.vision)
    patch_dim = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    image = MultimodalVision(jnp.zeros((plan.num_patches_padded, patch_dim), jnp.float32), plan.arrays)
    window = 2 * cfg.audio.n_window
    audio = MultimodalAudio(jnp.zeros((1, cfg.audio.num_mel_bins, window), jnp.float32),
                            jnp.full((1,), window, jnp.int32), num_tokens=1)
    ids = jnp.zeros((1, 2), jnp.int32)
    return thinker.init(rng, ids, jnp.zeros((3, 1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
                        audio=audio, image=image)
