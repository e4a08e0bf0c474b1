"""The Talker (spec §8): a Qwen2-style decoder that predicts speech codec tokens from thinker states.

Its inputs live in the thinker's embedding space (width `embedding_size`): thinker hidden states + token
embeddings, plus codec embeddings (its own `embed_tokens` has thinker width too). `thinker_to_talker_proj`
maps the sum down to the talker width; `codec_head` gives the codec logits (float32).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.models.kv_cache import KVCache
from omni_jax.models.layers import Einsum, Embed
from omni_jax.models.text_decoder import TextDecoder


@flax.struct.dataclass
class TalkerOutput:
    logits: jax.Array  # [B, T or 1, codec_vocab] float32
    cache: Optional[KVCache]


class Talker(nn.Module):
    config: Any  # omni_jax.config.TalkerConfig
    options: Any  # omni_jax.config.RuntimeOptions

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(self.options.dtype), jnp.dtype(self.options.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, platform=self.options.platform)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.embedding_size, **kw)
        self.thinker_to_talker_proj = Einsum("bte,ed->btd", (cfg.embedding_size, cfg.hidden_size),
                                             ("embed", "talker_embed"), (cfg.hidden_size,), ("talker_embed",), **kw)
        self.decoder = TextDecoder(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            mrope_section=tuple(cfg.mrope_section),
            attention_backend=self.options.attention_backend,
            remat_policy=self.options.remat_policy,
            scan_layers=self.options.scan_layers,
            **kw,
        )
        self.codec_head = Einsum("btd,dv->btv", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), **kw)

    def embed_codec(self, codes: jax.Array) -> jax.Array:
        """Codec ids [...] -> embeddings [..., embedding_size] (thinker width)."""
        return self.embed_tokens(codes)

    def __call__(
        self,
        inputs_embeds: jax.Array,  # [B, T, embedding_size] thinker-space inputs (already summed)
        positions: jax.Array,  # [3, B, T]
        segment_ids: jax.Array,  # [B, T] int32, 0 = padding
        cache: Optional[KVCache] = None,
        last_logits_only: bool = False,
    ) -> TalkerOutput:
        hidden = self.thinker_to_talker_proj(inputs_embeds)  # [B, T, D_talker]
        hidden, cache = self.decoder(hidden, positions, segment_ids, cache)
        head_in = hidden[:, -1:, :] if last_logits_only else hidden
        return TalkerOutput(logits=self.codec_head(head_in).astype(jnp.float32), cache=cache)


def init_talker(talker: Talker, rng: jax.Array) -> dict:
    """Variables of the talker from tiny dummy inputs."""
    embeds = jnp.zeros((1, 2, talker.config.embedding_size), jnp.float32)
    variables = talker.init(rng, embeds, jnp.zeros((3, 1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))
    # embed_tokens is only used through embed_codec; make sure it exists.
    extra = talker.init(rng, jnp.zeros((1,), jnp.int32), method=Talker.embed_codec)
    params = dict(variables["params"])
    params.update(extra["params"])
    return {"params": params}
