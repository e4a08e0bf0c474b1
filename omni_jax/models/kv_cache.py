"""The explicit, preallocated KV cache pytree shared by prefill and cached decode.

Two workarounds for XLA:CPU live here, both taken only in a CPU program (`omni_jax.kernels.target.cpu_paths`):
16-bit float caches are held as their uint16 bits (`storage_dtype`), and slot writes into 16-bit arrays go
through a uint16 view (`write_cache_slots`). Elsewhere a cache holds its dtype and writes are plain."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.kernels import target


def write_cache_slots(cache: jax.Array, new: jax.Array, start: Sequence, platform: str = "auto") -> jax.Array:
    """`dynamic_update_slice(cache, new.astype(cache.dtype), start)`, in place for 16-bit caches too.

    XLA:CPU's bfloat16 normalization turns a bf16 update slice fused with its producer (the rotary embedding)
    into convert(cache) -> f32 update -> convert back: a pass over the whole [L, B, S, K, d] cache for every layer
    (talker bf16 decode at batch 8: ~18 of ~140 ms a step). In a CPU program the cache's bits are updated as
    uint16, which keeps it a slot write; the values are the same."""
    new = new.astype(cache.dtype)
    if cache.dtype.itemsize != 2 or not target.cpu_paths(platform):
        return jax.lax.dynamic_update_slice(cache, new, start)
    bits = jax.lax.bitcast_convert_type
    return bits(jax.lax.dynamic_update_slice(bits(cache, jnp.uint16), bits(new, jnp.uint16), start), cache.dtype)


def storage_dtype(dtype, platform: str = "auto") -> jnp.dtype:
    """What a cache of `dtype` holds in a program for `platform`: on the CPU the bits (uint16) of a 16-bit float,
    else the dtype itself.

    A decode loop carries the cache through `lax.while_loop`. XLA:CPU updates a 16-bit float cache's slots through
    a uint16 view (`write_cache_slots`), and when the carried array is bfloat16 the view costs a conversion pass
    over the whole [L, B, S, K, d] cache on entry and exit of each step (talker bf16, batch 8, 1058 slots: 4 passes
    of 208 MB a step, ~45 of ~280 ms). Holding the bits removes them; reads bitcast the layer they need."""
    dtype = jnp.dtype(dtype)
    bits = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 and target.cpu_paths(platform)
    return jnp.dtype(jnp.uint16) if bits else dtype


def to_storage(x: jax.Array, dtype, stored: Optional[jnp.dtype] = None) -> jax.Array:
    """x as a cache of logical `dtype` held as `stored` keeps it: cast to `dtype`, then its bits where `stored`
    differs (uint16 for a 16-bit float). `stored` defaults to `storage_dtype(dtype)`; pass the cache array's dtype
    to match a given cache."""
    x = x.astype(dtype)
    stored = storage_dtype(dtype) if stored is None else jnp.dtype(stored)
    return jax.lax.bitcast_convert_type(x, stored) if stored != x.dtype else x


def from_storage(x: jax.Array, dtype) -> jax.Array:
    """Inverse of `to_storage`: stored cache entries as logical `dtype`."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != jnp.dtype(dtype) else x


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, stacked on a leading layer axis.

    Rows are left padded, so every row writes the same slot range at each step and one `length` serves all.
    `k`/`v` hold `storage_dtype(dtype, platform)` as `init` chose it (the bits of a 16-bit float cache on the CPU,
    `dtype` elsewhere: the arrays' dtype says which); `layer_k`/`layer_v` read as `dtype`.
    """

    k: jax.Array  # [L, B, S, K, d] storage_dtype(dtype, platform)
    v: jax.Array  # [L, B, S, K, d] storage_dtype(dtype, platform)
    segment_ids: jax.Array  # [B, S] int32: 1 where a real token was written, 0 for padding / empty slots
    length: jax.Array  # [] int32: number of slots written so far
    dtype: jnp.dtype = flax.struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))  # keys/values dtype

    @classmethod
    def init(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype,
             platform: str = "auto") -> "KVCache":
        """An empty cache of logical `dtype` for a program on `platform` (which picks the storage dtype)."""
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        stored = storage_dtype(dtype, platform)
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


@flax.struct.dataclass
class PagedKVCache:
    """A paged KV cache (`omni_jax.kernels.paged_attention`) seen by one call of the decoder: the page pools of
    every layer, and which pages the call's rows own.

    Each call appends tokens to its rows: the real tokens of a row are the leading ones of its segment ids
    (padding after them), written at cache indices `lengths[b]`, `lengths[b] + 1`, ... The host owns the page
    tables and lengths (`serve.pages.PageAllocator`); the decoder returns the cache with the pools updated and
    `lengths` advanced."""

    pages: tuple  # L arrays [N, P, 2K, d] storage_dtype(dtype, platform): keys/values interleaved on the heads axis
    page_table: jax.Array  # [B, M] int32 page ids of each row, in order (shard-local under a mesh)
    lengths: jax.Array  # [B] int32 tokens each row holds before this call
    dtype: jnp.dtype = flax.struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))  # keys/values dtype

    @staticmethod
    def init_pages(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype,
                   platform: str = "auto") -> tuple:
        """Empty page pools: `num_layers` arrays [num_pages, page_size, 2 * num_kv_heads, head_dim]."""
        stored = storage_dtype(dtype, platform)
        shape = (num_pages, page_size, 2 * num_kv_heads, head_dim)
        return tuple(jnp.zeros(shape, stored) for _ in range(num_layers))

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]
