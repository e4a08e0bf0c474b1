"""The one attention entry point (backends: xla, cudnn, pallas) and the mask description all callers share.

Every mask in the model is expressed by `AttentionMask`:
  * query t may attend key s only if q_segment_ids[b, t] == kv_segment_ids[b, s] and kv_segment_ids[b, s] != 0
    (segment 0 = padding or an empty KV-cache slot; packed sequences use segments 1, 2, ...; encoder windows use
    one segment per window);
  * with `causal`, additionally kv_slots[b, s] <= q_slots[b, t] (slots are positions in the sequence / cache,
    not RoPE positions);
  * `allowed`, when given, is an extra dense boolean [B, T, S] mask that is and-ed in (used for block-structured
    masks such as the DiT's look-ahead/look-back blocks).
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

BACKENDS = ("xla", "cudnn", "pallas")


@flax.struct.dataclass
class AttentionMask:
    q_segment_ids: jax.Array  # [B, T] int32
    kv_segment_ids: jax.Array  # [B, S] int32
    q_slots: jax.Array  # [B, T] int32
    kv_slots: jax.Array  # [B, S] int32
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    allowed: Optional[jax.Array] = None  # [B, T, S] bool

    def dense(self) -> jax.Array:
        """The full boolean mask [B, T, S]."""
        same = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
        ok = same & (self.kv_segment_ids[:, None, :] != 0)
        if self.causal:
            ok = ok & (self.kv_slots[:, None, :] <= self.q_slots[:, :, None])
        if self.allowed is not None:
            ok = ok & self.allowed
        return ok


def causal_mask(segment_ids: jax.Array) -> AttentionMask:
    """Causal self-attention over a [B, T] sequence; segment_ids 0 = padding (e.g. the attention_mask)."""
    batch, length = segment_ids.shape
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    seg = segment_ids.astype(jnp.int32)
    return AttentionMask(seg, seg, slots, slots, causal=True)


def bidirectional_mask(segment_ids: jax.Array) -> AttentionMask:
    """Full attention within each segment (encoder windows, frames); 0 = padding."""
    batch, length = segment_ids.shape
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    seg = segment_ids.astype(jnp.int32)
    return AttentionMask(seg, seg, slots, slots, causal=False)


def _xla_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    allowed = mask.dense()[:, None, None, :, :]  # [B, 1, 1, T, S]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(allowed, probs, 0.0)  # rows with no allowed key give 0, not a mean of values
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def _cudnn_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    allowed = mask.dense()[:, None, :, :]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale, implementation="cudnn")
    any_allowed = jnp.any(allowed, axis=-1)[:, 0, :, None, None]  # [B, T, 1, 1]
    return jnp.where(any_allowed, out, 0).astype(q.dtype)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, scale: float | None = None, backend: str = "xla"
) -> jax.Array:
    """Scaled dot-product attention with GQA.

    q [B, T, H, d], k/v [B, S, K, d] with H % K == 0 (query head h reads kv head h // (H/K)).
    Returns [B, T, H, d] in q's dtype; softmax in float32.
    """
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "xla":
        return _xla_attention(q, k, v, mask, scale)
    if backend == "cudnn":
        return _cudnn_attention(q, k, v, mask, scale)
    if backend == "pallas":
        if mask.allowed is not None:
            # Dense extra masks are not block-sparse; the xla path is the right tool for them.
            return _xla_attention(q, k, v, mask, scale)
        from omni_jax.models.pallas_attention import pallas_attention

        return pallas_attention(
            q, k, v,
            q_segment_ids=mask.q_segment_ids, kv_segment_ids=mask.kv_segment_ids,
            q_positions=mask.q_slots, kv_positions=mask.kv_slots,
            causal=mask.causal, scale=scale,
        )
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
