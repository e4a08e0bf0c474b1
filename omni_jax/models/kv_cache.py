"""The explicit, preallocated KV cache pytree shared by prefill and cached decode."""
from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp


def write_cache_slots(cache: jax.Array, new: jax.Array, start: Sequence) -> jax.Array:
    """`dynamic_update_slice(cache, new.astype(cache.dtype), start)`, in place for 16-bit caches too.

    XLA:CPU's bfloat16 normalization turns a bf16 update slice fused with its producer (the rotary embedding)
    into convert(cache) -> f32 update -> convert back: a pass over the whole [L, B, S, K, d] cache for every layer
    (talker bf16 decode at batch 8: ~18 of ~140 ms a step). Updating the cache's bits as uint16 keeps it a slot
    write; the values are the same."""
    new = new.astype(cache.dtype)
    if cache.dtype.itemsize != 2:
        return jax.lax.dynamic_update_slice(cache, new, start)
    bits = jax.lax.bitcast_convert_type
    return bits(jax.lax.dynamic_update_slice(bits(cache, jnp.uint16), bits(new, jnp.uint16), start), cache.dtype)


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, stacked on a leading layer axis.

    Rows are left padded, so every row writes the same slot range at each step and one `length` serves all.
    """

    k: jax.Array  # [L, B, S, K, d]
    v: jax.Array  # [L, B, S, K, d]
    segment_ids: jax.Array  # [B, S] int32: 1 where a real token was written, 0 for padding / empty slots
    length: jax.Array  # [] int32: number of slots written so far

    @classmethod
    def init(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_length), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.k.shape[2]
