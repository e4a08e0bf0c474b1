"""The Thinker: token embeddings, the Qwen2.5 decoder stack and the untied lm_head.

The multimodal encoders (audio, vision) and the scatter of their outputs into placeholder positions plug in
before the decoder; `__call__` takes either token ids or ready input embeddings.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.models.kv_cache import KVCache
from omni_jax.models.layers import Einsum, Embed, constrain
from omni_jax.models.text_decoder import TextDecoder


@flax.struct.dataclass
class ThinkerOutput:
    logits: jax.Array  # [B, T or 1, V] float32
    hidden_states: jax.Array  # [B, T, D] post-final-norm (what the talker consumes)
    cache: Optional[KVCache]


class Thinker(nn.Module):
    config: Any  # omni_jax.config.ThinkerConfig
    options: Any  # omni_jax.config.RuntimeOptions

    def setup(self):
        text = self.config.text
        dtype, param_dtype = jnp.dtype(self.options.dtype), jnp.dtype(self.options.param_dtype)
        self.embed_tokens = Embed(text.vocab_size, text.hidden_size, dtype=dtype, param_dtype=param_dtype)
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
        )
        self.lm_head = Einsum("btd,dv->btv", (text.hidden_size, text.vocab_size), ("embed", "vocab"),
                              dtype=dtype, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D] embeddings."""
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        input_ids: Optional[jax.Array],  # [B, T] int32
        positions: jax.Array,  # [3, B, T] TMRoPE positions
        segment_ids: jax.Array,  # [B, T] int32, 0 = padding
        cache: Optional[KVCache] = None,
        inputs_embeds: Optional[jax.Array] = None,  # [B, T, D] instead of input_ids (multimodal merge)
        last_logits_only: bool = False,
    ) -> ThinkerOutput:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        hidden, cache = self.decoder(inputs_embeds, positions, segment_ids, cache)
        head_in = hidden[:, -1:, :] if last_logits_only else hidden
        logits = self.lm_head(head_in).astype(jnp.float32)  # [B, T, V]
        logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return ThinkerOutput(logits=logits, hidden_states=hidden, cache=cache)
