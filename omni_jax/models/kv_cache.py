"""The explicit, preallocated KV cache pytree shared by prefill and cached decode."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


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
