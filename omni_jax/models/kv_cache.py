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


def storage_dtype(dtype) -> jnp.dtype:
    """What a cache of `dtype` holds: the bits (uint16) of a 16-bit float, else the dtype itself.

    A decode loop carries the cache through `lax.while_loop`. XLA:CPU updates a 16-bit float cache's slots through
    a uint16 view (`write_cache_slots`), and when the carried array is bfloat16 the view costs a conversion pass
    over the whole [L, B, S, K, d] cache on entry and exit of each step (talker bf16, batch 8, 1058 slots: 4 passes
    of 208 MB a step, ~45 of ~280 ms). Holding the bits removes them; reads bitcast the layer they need."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else dtype


def to_storage(x: jax.Array, dtype) -> jax.Array:
    """x as a cache of logical `dtype` stores it (cast, then the bits for 16-bit floats)."""
    x = x.astype(dtype)
    stored = storage_dtype(dtype)
    return jax.lax.bitcast_convert_type(x, stored) if stored != x.dtype else x


def from_storage(x: jax.Array, dtype) -> jax.Array:
    """Inverse of `to_storage`: stored cache entries as logical `dtype`."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != jnp.dtype(dtype) else x


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, stacked on a leading layer axis.

    Rows are left padded, so every row writes the same slot range at each step and one `length` serves all.
    `k`/`v` hold `storage_dtype(dtype)` (the bits of a 16-bit float cache); `layer_k`/`layer_v` read as `dtype`.
    """

    k: jax.Array  # [L, B, S, K, d] storage_dtype(dtype)
    v: jax.Array  # [L, B, S, K, d] storage_dtype(dtype)
    segment_ids: jax.Array  # [B, S] int32: 1 where a real token was written, 0 for padding / empty slots
    length: jax.Array  # [] int32: number of slots written so far
    dtype: jnp.dtype = flax.struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))  # keys/values dtype

    @classmethod
    def init(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        stored = storage_dtype(dtype)
        return cls(
            k=jnp.zeros(shape, stored),
            v=jnp.zeros(shape, stored),
            segment_ids=jnp.zeros((batch, max_length), jnp.int32),
            length=jnp.zeros((), jnp.int32),
            dtype=jnp.dtype(dtype),
        )

    def layer_k(self, layer) -> jax.Array:
        """Keys of one layer as `dtype`: [B, S, K, d]."""
        return from_storage(self.k[layer], self.dtype)

    def layer_v(self, layer) -> jax.Array:
        """Values of one layer as `dtype`: [B, S, K, d]."""
        return from_storage(self.v[layer], self.dtype)

    @property
    def max_length(self) -> int:
        return self.k.shape[2]
