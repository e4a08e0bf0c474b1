"""Token selection: repetition penalty, suppressed tokens, temperature, top-k, top-p, with explicit RNG keys.

The order and semantics follow HF's logits processors/warpers (RepetitionPenalty -> SuppressTokens ->
Temperature -> TopK -> TopP), so a filtered distribution here equals HF's for the same logits. Parameters are
per row ([B] arrays) so one compiled step serves a batch of requests with different settings; a row with
temperature 0 is greedy (argmax of the penalised logits).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@flax.struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] float32; 1 = off
    repetition_penalty: jax.Array  # [B] float32; 1 = off

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> "SamplingParams":
        """Broadcast scalars (or per-row sequences) to [B] arrays, validating the values."""
        def col(value, dtype, name, ok):
            arr = np.broadcast_to(np.asarray(value, dtype), (batch,)).copy()
            bad = ~ok(arr)
            if bad.any():
                raise ValueError(f"{name}={arr[bad][0]!r} is out of range (row {int(np.nonzero(bad)[0][0])})")
            return jnp.asarray(arr)

        return cls(
            temperature=col(temperature, np.float32, "temperature", lambda a: a >= 0),
            top_k=col(top_k, np.int32, "top_k", lambda a: a >= 0),
            top_p=col(top_p, np.float32, "top_p", lambda a: (a > 0) & (a <= 1)),
            repetition_penalty=col(repetition_penalty, np.float32, "repetition_penalty", lambda a: a > 0),
        )


def seen_mask(token_ids: jax.Array, vocab_size: int, valid: Optional[jax.Array] = None) -> jax.Array:
    """[B, L] ids (and optional [B, L] validity) -> [B, V] bool: which ids occur in each row."""
    batch = token_ids.shape[0]
    valid = jnp.ones(token_ids.shape, bool) if valid is None else valid.astype(bool)
    ids = jnp.where(valid, token_ids, vocab_size)  # invalid entries go to a dropped extra column
    mask = jnp.zeros((batch, vocab_size + 1), bool).at[jnp.arange(batch)[:, None], ids].set(True)
    return mask[:, :vocab_size]


def process_logits(logits: jax.Array, params: SamplingParams, seen: Optional[jax.Array] = None,
                   suppress_tokens: Sequence[int] = ()) -> jax.Array:
    """Apply penalty, suppression, temperature, top-k and top-p. [B, V] float32 -> [B, V] (filtered = -inf).

    For greedy rows (temperature 0) only the penalty and suppression apply. The full-vocabulary sorts of top-k
    and top-p run only when some row uses them (`lax.cond`): they cost more than a decode step's matmuls on CPU.
    """
    logits = penalise(logits, params, seen, suppress_tokens)
    greedy = params.temperature[:, None] == 0
    scaled = logits / jnp.where(greedy, 1.0, params.temperature[:, None])

    def top_k(scaled):  # keep logits >= the k-th largest (ties kept, as HF)
        sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
        vocab = scaled.shape[-1]
        k = jnp.clip(params.top_k, 1, vocab)
        kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
        use_k = (params.top_k > 0)[:, None]
        return jnp.where(use_k & (scaled < kth), NEG_INF, scaled)

    def top_p(scaled):  # HF: sort ascending, drop tokens whose cumulative probability <= 1 - top_p, keep the best
        sorted_asc = jnp.sort(scaled, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
        drop_sorted = cum <= (1.0 - params.top_p)[:, None]
        drop_sorted = drop_sorted.at[:, -1].set(False)
        # threshold = the smallest kept logit; everything below it is removed (ties at the threshold kept)
        kept_min = jnp.min(jnp.where(drop_sorted, jnp.inf, sorted_asc), axis=-1, keepdims=True)
        use_p = (params.top_p < 1.0)[:, None]
        return jnp.where(use_p & (scaled < kept_min), NEG_INF, scaled)

    scaled = jax.lax.cond(jnp.any(params.top_k > 0), top_k, lambda x: x, scaled)
    scaled = jax.lax.cond(jnp.any(params.top_p < 1.0), top_p, lambda x: x, scaled)
    return jnp.where(greedy, logits, scaled)


def penalise(logits: jax.Array, params: SamplingParams, seen: Optional[jax.Array] = None,
             suppress_tokens: Sequence[int] = ()) -> jax.Array:
    """Repetition penalty (on ids in `seen`) and suppressed tokens: [B, V] -> [B, V] float32."""
    logits = logits.astype(jnp.float32)
    if seen is not None:
        penalty = params.repetition_penalty[:, None]
        penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
        logits = jnp.where(seen, penalised, logits)
    if suppress_tokens:
        logits = logits.at[:, jnp.asarray(list(suppress_tokens))].set(NEG_INF)
    return logits


def select_tokens(logits: jax.Array, params: SamplingParams, key: jax.Array, seen: Optional[jax.Array] = None,
                  suppress_tokens: Sequence[int] = ()) -> jax.Array:
    """[B, V] logits -> [B] int32 tokens: argmax for greedy rows, a categorical draw otherwise.

    When every row is greedy only the penalty/suppression and an argmax run (no sort, no draw)."""
    def sample(logits):
        processed = process_logits(logits, params, seen, suppress_tokens)
        drawn = jax.random.categorical(key, processed, axis=-1)
        return jnp.where(params.temperature == 0, jnp.argmax(processed, axis=-1), drawn).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(penalise(logits, params, seen, suppress_tokens), axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.any(params.temperature > 0), sample, greedy, logits)
