"""Text generation core: prefill and an on-device decode loop over the explicit KV cache.

Everything per step happens inside one `lax.while_loop`; the host only sees the state between chunks of
steps (so streaming can surface tokens every `chunk` steps without a round trip per token).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.models.kv_cache import KVCache


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


def greedy(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] int32 argmax."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _record(state: DecodeState, token: jax.Array, eos_ids: jax.Array, pad_id: int) -> DecodeState:
    """Append `token` [B] (pad for finished rows) and update the done flags."""
    token = jnp.where(state.done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    done = state.done | jnp.isin(token, eos_ids)
    return state.replace(tokens=tokens, last_token=token, step=state.step + 1, done=done)


def prefill(apply_fn, params, input_ids, attention_mask, positions, first_position, cache: KVCache,
            max_new_tokens: int, eos_ids, pad_id: int, multimodal=None) -> DecodeState:
    """Run the prompt through the model, pick the first token, and return the decode state.

    apply_fn(params, input_ids, positions, segment_ids, cache, multimodal) -> ThinkerOutput (last logits);
    `multimodal` is a dict of encoder inputs (audio/image/video) or None.
    """
    out = apply_fn(params, input_ids, positions, attention_mask.astype(jnp.int32), cache, multimodal)
    batch = input_ids.shape[0]
    state = DecodeState(
        cache=out.cache,
        last_token=jnp.zeros((batch,), jnp.int32),
        position=first_position.astype(jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((batch,), bool),
    )
    return _record(state, greedy(out.logits[:, -1]), eos_ids, pad_id)


def decode_steps(apply_fn, params, state: DecodeState, num_steps: int, eos_ids, pad_id: int) -> DecodeState:
    """Run up to `num_steps` cached decode steps on device, stopping early when every row is done."""
    limit = jnp.minimum(state.step + num_steps, state.tokens.shape[1])

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        ids = s.last_token[:, None]  # [B, 1]
        positions = jnp.broadcast_to(s.position[None, :, None], (3,) + ids.shape)  # [3, B, 1]
        out = apply_fn(params, ids, positions, jnp.ones_like(ids), s.cache, None)
        s = s.replace(cache=out.cache, position=s.position + 1)
        return _record(s, greedy(out.logits[:, -1]), eos_ids, pad_id)

    return jax.lax.while_loop(cond, body, state)


def make_generate_fns(apply_fn, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int):
    """Jitted (prefill, decode_steps) closures for fixed generation settings; caches/states are donated."""
    eos = jnp.asarray(list(eos_ids), jnp.int32)

    @partial(jax.jit, donate_argnums=(5,))
    def prefill_fn(params, input_ids, attention_mask, positions, first_position, cache, multimodal=None):
        return prefill(apply_fn, params, input_ids, attention_mask, positions, first_position, cache,
                       max_new_tokens, eos, pad_id, multimodal)

    @partial(jax.jit, static_argnums=(2,), donate_argnums=(1,))
    def decode_fn(params, state, num_steps):
        return decode_steps(apply_fn, params, state, num_steps, eos, pad_id)

    return prefill_fn, decode_fn
