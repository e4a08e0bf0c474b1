"""Device programs of continuous batching over a paged KV cache (the engine is `serve.continuous`).

Three jitted programs, each compiled for a few shapes:
  * `embed`: a whole prompt's input embeddings [1, T, D], with the encoders' outputs (audio, image, video) merged
    in. Run once per request when it is admitted.
  * `prefill_chunk`: R rows (one real row, padded to the mesh's row multiple) of up to C prompt tokens, given as
    embeddings, written into the rows' pages; returns the token chosen after each row's last real token (used
    after a prompt's last chunk) and the chunk's hidden states (the talker reads them).
  * `decode_step`: one token for every slot of the engine, [S] rows whatever their occupancy (idle slots have no
    real token and write the scratch page).

Sampling is per row with per-request keys: the key of a request's n-th generated token is
`fold_in(key(seed), n)`, so a request's output depends on the request and its seed only, not on its neighbours
(`sampling.select_tokens_per_row`).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from omni_jax.models.kv_cache import PagedKVCache
from omni_jax.models.thinker import Thinker
from omni_jax.sampling import SamplingParams, select_tokens_per_row, seen_mask
from omni_jax.sharding import rules_context


def token_keys(key_data: jax.Array, counts: jax.Array) -> jax.Array:
    """Typed keys [B] for the counts[b]-th token of each row, from each request's raw key data [B, 2] uint32."""
    return jax.vmap(lambda k, n: jax.random.fold_in(jax.random.wrap_key_data(k), n))(key_data, counts)


class PagedPrograms:
    """The jitted programs for one `OmniModel` (its thinker, options and mesh); pages and `seen` are donated."""

    def __init__(self, model):
        self.model = model
        self.thinker: Thinker = model.thinker
        self.vocab_size = model.config.thinker.text.vocab_size
        self.embed = jax.jit(self._embed)
        self.prefill_chunk = jax.jit(self._prefill_chunk, donate_argnums=(1,))
        self.decode_step = jax.jit(self._decode_step, donate_argnums=(1, 9))
        self.prompt_seen = jax.jit(self._prompt_seen)
        self.set_seen_rows = jax.jit(self._set_seen_rows, donate_argnums=(0,))
        self.chunk_embeds = jax.jit(self._chunk_embeds, static_argnames=("rows", "chunk"))

    def _apply(self, params, **kwargs):  # noqa: D401 - the thinker's apply
        with rules_context():
            return self.thinker.apply({"params": params}, **kwargs)

    def _embed(self, params, input_ids, multimodal):
        """input_ids [1, T] + encoder inputs -> [1, T, D] merged embeddings."""
        with rules_context():
            return self.thinker.apply({"params": params}, input_ids, **multimodal, method=Thinker.embed_multimodal)

    def _prefill_chunk(self, params, pages, embeds, positions, page_table, lengths, q_lens, sampling, key_data,
                       seen_row, row):
        """embeds [R, C, D], positions [3, R, C], page_table [R, M], lengths / q_lens [R], seen_row [1, V] (the
        ids the repetition penalty sees, of the real row `row`) -> (token [R] after each row's last real token,
        pages, hidden [R, C, D])."""
        chunk = embeds.shape[1]
        seen = jnp.zeros((embeds.shape[0], seen_row.shape[-1]), bool).at[row].set(seen_row[0])
        segment_ids = (jnp.arange(chunk)[None, :] < q_lens[:, None]).astype(jnp.int32)
        cache = PagedKVCache(pages, page_table, lengths, dtype=jnp.dtype(self.model.options.dtype))
        out = self._apply(params, input_ids=None, positions=positions, segment_ids=segment_ids, cache=cache,
                          inputs_embeds=embeds, logits_at=jnp.maximum(q_lens - 1, 0))
        keys = token_keys(key_data, jnp.zeros(q_lens.shape, jnp.int32))
        token = select_tokens_per_row(out.logits[:, -1], sampling, keys, seen)
        return token, out.cache.pages, out.hidden_states

    def _decode_step(self, params, pages, tokens, positions, page_table, lengths, active, sampling, key_data, seen,
                     counts):
        return decode_step(partial(self._apply, params), pages, tokens, positions, page_table, lengths, active,
                           sampling, key_data, seen, counts, cache_dtype=jnp.dtype(self.model.options.dtype))

    @staticmethod
    def _chunk_embeds(embeds, start, row, *, rows: int, chunk: int):
        """embeds[0, start:start + chunk] of a prompt [1, T, D] (zeros past its end) as row `row` of [rows, chunk,
        D] (the other rows zero)."""
        padded = jnp.pad(embeds[0], ((0, chunk), (0, 0)))
        piece = jax.lax.dynamic_slice_in_dim(padded, start, chunk, axis=0)  # [chunk, D]
        return jnp.zeros((rows, chunk, embeds.shape[-1]), embeds.dtype).at[row].set(piece)

    def _prompt_seen(self, input_ids, valid):
        """[1, T] ids of a prompt (+ validity) -> [1, V] bool: the ids the repetition penalty sees."""
        return seen_mask(input_ids, self.vocab_size, valid)

    @staticmethod
    def _set_seen_rows(seen, rows, values, tokens):
        """seen [S, V] with rows[i] set to values[i] | the one-hot of tokens[i]."""
        values = values.at[jnp.arange(tokens.shape[0]), tokens].set(True)
        return seen.at[rows].set(values)


def decode_step(apply_fn, pages, tokens, positions, page_table, lengths, active, sampling, key_data, seen, counts, *,
                cache_dtype):
    """One token for every slot: tokens / positions / lengths / counts [S] int32, active [S] bool, page_table
    [S, M], key_data [S, 2] uint32, seen [S, V] bool -> (next tokens [S], pages, seen, hidden [S, D] of the fed
    tokens). `apply_fn(**thinker kwargs)` is the thinker's apply with the params bound."""
    ids = tokens[:, None]
    pos = jnp.broadcast_to(positions[None, :, None], (3,) + ids.shape)  # the 3 TMRoPE axes agree after a prompt
    cache = PagedKVCache(pages, page_table, lengths, dtype=jnp.dtype(cache_dtype))
    out = apply_fn(input_ids=ids, positions=pos, segment_ids=active[:, None].astype(jnp.int32), cache=cache,
                   last_logits_only=True)
    token = select_tokens_per_row(out.logits[:, -1], sampling, token_keys(key_data, counts), seen)
    seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    return token, out.cache.pages, seen, out.hidden_states[:, -1]


def sampling_rows(requests, pad_to: int) -> SamplingParams:
    """Per-row SamplingParams of `requests` (objects with temperature/top_k/top_p/repetition_penalty), padded with
    greedy rows to `pad_to`."""
    def col(name, default):
        return [getattr(r, name) for r in requests] + [default] * (pad_to - len(requests))

    return SamplingParams.make(pad_to, col("temperature", 0.0), col("top_k", 0), col("top_p", 1.0),
                               col("repetition_penalty", 1.0))


__all__ = ["PagedPrograms", "decode_step", "sampling_rows", "token_keys"]
