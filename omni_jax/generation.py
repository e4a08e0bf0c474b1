"""Thinker text generation core: prefill and an on-device decode loop over the explicit KV cache.

Everything per step happens inside one `lax.while_loop`; the host only sees the state between chunks of
steps (streaming surfaces tokens every `chunk` steps without a round trip per token). Token selection is
`sampling.select_tokens` (greedy rows when temperature is 0).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.models.kv_cache import KVCache, write_cache_slots
from omni_jax.sampling import SamplingParams, seen_mask, select_tokens


def bucket_length(length: int, buckets: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)) -> int:
    """Round a prompt length up to a bucket so the number of compiled shapes stays small."""
    for b in buckets:
        if length <= b:
            return b
    step = buckets[-1]
    return -(-length // step) * step


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    last_token: jax.Array  # [B] int32: the token to feed next
    position: jax.Array  # [B] int32: its RoPE position (same on all 3 axes: prompts end with text)
    tokens: jax.Array  # [B, N] int32: generated tokens (pad after a row is done)
    step: jax.Array  # [] int32: number of tokens generated
    done: jax.Array  # [B] bool
    key: jax.Array  # PRNG key, split once per step
    sampling: SamplingParams
    seen: Optional[jax.Array]  # [B, V] bool ids seen so far (for the repetition penalty), or None
    hidden: Optional[jax.Array]  # [B, N, D]: hidden[k-1] = post-norm hidden at the step whose input is token k
    #                               (what the talker consumes), or None when not kept


def record_token(state: DecodeState, logits: jax.Array, eos_ids: jax.Array, pad_id: int,
                 suppress_tokens: Sequence[int] = ()) -> DecodeState:
    """Select the next token from logits [B, V], append it (pad for finished rows), update flags."""
    key, sub = jax.random.split(state.key)
    token = select_tokens(logits, state.sampling, sub, state.seen, suppress_tokens)
    token = jnp.where(state.done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    seen = state.seen
    if seen is not None:
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    done = state.done | jnp.isin(token, eos_ids)
    return state.replace(tokens=tokens, last_token=token, step=state.step + 1, done=done, key=key, seen=seen)


def prefill(apply_fn, params, input_ids, attention_mask, positions, first_position, cache: KVCache, key,
            sampling: SamplingParams, *, max_new_tokens: int, eos_ids, pad_id: int, vocab_size: int,
            use_penalty: bool, keep_hidden: bool, multimodal=None):
    """Run the prompt, pick the first token, return (decode state, prefill ThinkerOutput).

    apply_fn(params, input_ids, positions, segment_ids, cache, multimodal) -> ThinkerOutput.
    """
    out = apply_fn(params, input_ids, positions, attention_mask.astype(jnp.int32), cache, multimodal)
    batch = input_ids.shape[0]
    hidden_dim = out.hidden_states.shape[-1]
    state = DecodeState(
        cache=out.cache,
        last_token=jnp.zeros((batch,), jnp.int32),
        position=first_position.astype(jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((batch,), bool),
        key=key,
        sampling=sampling,
        seen=seen_mask(input_ids, vocab_size, attention_mask) if use_penalty else None,
        hidden=jnp.zeros((batch, max_new_tokens, hidden_dim), out.hidden_states.dtype) if keep_hidden else None,
    )
    # The prefill's hidden states and merged embeddings feed the talker; drop them when not needed.
    return record_token(state, out.logits[:, -1], eos_ids, pad_id), (out if keep_hidden else None)


def decode_steps(apply_fn, params, state: DecodeState, num_steps: int, eos_ids, pad_id: int,
                 platform: str = "auto") -> DecodeState:
    """Run up to `num_steps` cached decode steps on device, stopping early when every row is done; `platform` is
    the program's target (omni_jax.kernels.target)."""
    limit = jnp.minimum(state.step + num_steps, state.tokens.shape[1])

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        ids = s.last_token[:, None]  # [B, 1]
        positions = jnp.broadcast_to(s.position[None, :, None], (3,) + ids.shape)  # [3, B, 1]
        out = apply_fn(params, ids, positions, jnp.ones_like(ids), s.cache, None)
        hidden = s.hidden
        if hidden is not None:  # the hidden state of the token just fed (token number `step`)
            hidden = write_cache_slots(hidden, out.hidden_states[:, -1:], (0, s.step - 1, 0), platform)
        s = s.replace(cache=out.cache, position=s.position + 1, hidden=hidden)
        return record_token(s, out.logits[:, -1], eos_ids, pad_id)

    return jax.lax.while_loop(cond, body, state)


def make_generate_fns(apply_fn, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, vocab_size: int,
                      use_penalty: bool = False, keep_hidden: bool = False, platform: str = "auto"):
    """Jitted (prefill, decode_steps) closures for fixed generation settings, for a program on `platform`;
    caches/states are donated."""
    eos = jnp.asarray(list(eos_ids), jnp.int32)
    static = dict(max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad_id, vocab_size=vocab_size,
                  use_penalty=use_penalty, keep_hidden=keep_hidden)

    @partial(jax.jit, donate_argnums=(5,))
    def prefill_fn(params, input_ids, attention_mask, positions, first_position, cache, key, sampling,
                   multimodal=None):
        return prefill(apply_fn, params, input_ids, attention_mask, positions, first_position, cache, key,
                       sampling, multimodal=multimodal, **static)

    @partial(jax.jit, static_argnums=(2,), donate_argnums=(1,))
    def decode_fn(params, state, num_steps):
        return decode_steps(apply_fn, params, state, num_steps, eos, pad_id, platform)

    return prefill_fn, decode_fn
