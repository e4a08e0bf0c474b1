"""The one attention entry point (backends: xla, cudnn, pallas) and the mask description all callers share.

Which path a backend takes follows the target platform (`platform`, see `omni_jax.kernels.target`), never the
host. The xla backend runs dense on accelerators and for short queries; in a CPU program, sequences of two or more
128-token blocks take a blocked online-softmax path that skips fully masked tiles (`_blocked_attention`), decode
steps a multiply-reduce form (`_decode_attention`) or the CPU cache kernels (`cached_attention`). The pallas
backend is the flash kernel of `omni_jax.kernels.pallas_attention` (Mosaic on TPU, interpret mode on the CPU).

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

from functools import partial
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.kernels import cache_attention, target
from omni_jax.models.kv_cache import from_storage

BACKENDS = ("xla", "cudnn", "pallas")


def allowed_pairs(seg_q, slot_q, seg_kv, slot_kv, causal: bool) -> jax.Array:
    """Segment ids and slots [B, T] (queries) / [B, S] (keys) -> allowed [B, T, S] (the rules above, without
    `allowed`); for a whole sequence or one tile of the blocked path."""
    ok = (seg_q[:, :, None] == seg_kv[:, None, :]) & (seg_kv[:, None, :] != 0)
    if causal:
        ok = ok & (slot_kv[:, None, :] <= slot_q[:, :, None])
    return ok


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
        ok = allowed_pairs(self.q_segment_ids, self.q_slots, self.kv_segment_ids, self.kv_slots, self.causal)
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


def _masked_probs(logits: jax.Array, allowed: jax.Array, axis: int, dtype) -> jax.Array:
    """Softmax of float32 `logits` over `axis` among the `allowed` keys, rounded to `dtype`; a query with no
    allowed key gets all-zero probabilities (its output is 0, not a mean of values)."""
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    return jnp.where(allowed, jax.nn.softmax(logits, axis=axis), 0.0).astype(dtype)


def _xla_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    probs = _masked_probs(logits, mask.dense()[:, None, None, :, :], -1, v.dtype)  # mask [B, 1, 1, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def _decode_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """`_xla_attention` for one query per row on the CPU, as multiply-reduce fusions that read k/v [B, S, K, d] in
    place. The dot form needs the (b, kv-head) batch dims leading, so XLA:CPU copied every layer's cache slice into
    [B, K, d, S] / [B, K, S, d] at every step: talker bf16 decode at batch 8 over 1058 slots, 82 ms of transposes
    and 30 ms of dots in a ~200 ms step. Same products and float32 sums (in another order) as `_xla_attention`,
    probabilities rounded to v's dtype as there."""
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    qf = q.reshape(batch, 1, num_kv_heads, groups, head_dim).astype(jnp.float32)  # [B, 1, K, G, d]
    logits = jnp.sum(qf * k.astype(jnp.float32)[:, :, :, None, :], axis=-1) * scale  # [B, S, K, G]
    probs = _masked_probs(logits, mask.dense()[:, 0, :, None, None], 1, v.dtype)  # mask [B, S, 1, 1]
    values = v.astype(jnp.float32)[:, :, :, None, :]  # [B, S, K, 1, d]
    out = jnp.sum(probs.astype(jnp.float32)[..., None] * values, axis=1)  # [B, K, G, d]
    return out.reshape(batch, 1, num_heads, head_dim).astype(q.dtype)


def _use_decode(q, platform: str = "auto") -> bool:
    """The multiply-reduce path for decode steps (one query per row) in a CPU program."""
    return q.shape[1] == 1 and target.cpu_paths(platform)


BLOCK = 128  # query / key block of the CPU blocked path


def _use_blocked(q, k, mask: AttentionMask, platform: str = "auto") -> bool:
    """The blocked path in a CPU program for sequences of at least two query blocks (prefill, training, encoders).

    Dense XLA attention materialises [B, H, T, S] float32 scores and runs several elementwise passes over them;
    on CPU those passes (not the matmuls) dominate: a 512-token causal layer took 25-40 ms dense vs ~8 ms blocked
    (docs/performance.md). Decode steps (T = 1) and dense extra masks (`allowed`) stay dense."""
    return (mask.allowed is None and q.shape[1] >= 2 * BLOCK and k.shape[1] >= BLOCK
            and target.cpu_paths(platform))


def _pad_to_block(x: jax.Array, axis: int, fill) -> jax.Array:
    pad = -x.shape[axis] % BLOCK
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=fill)


def _tiles_forward(q_blocks, k_blocks, v_blocks, q_seg, q_slot, kv_seg, kv_slot, causal: bool, scale: float):
    """Online softmax over tiles. q_blocks [B, nq, bq, K, G, d], k/v_blocks [B, nk, bk, K, d], q_seg/q_slot
    [B, nq, bq], kv_seg/kv_slot [B, nk, bk] -> (out [nq, B, K, G, bq, d] f32, logsumexp [nq, B, K, G, bq] f32;
    0 for rows with no allowed key, whose output is 0)."""
    batch, _, block_q, num_kv_heads, groups, head_dim = q_blocks.shape
    nq, nk = q_blocks.shape[1], k_blocks.shape[1]
    neg = jnp.finfo(jnp.float32).min

    def query_block(i):
        q_i = q_blocks[:, i]  # [B, bq, K, G, d]

        def key_block(j, carry):
            allowed = allowed_pairs(q_seg[:, i], q_slot[:, i], kv_seg[:, j], kv_slot[:, j], causal)  # [B, bq, bk]

            def update(carry):
                running_max, denom, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, d]
                scores = jnp.einsum("btkgd,bskd->bkgts", q_i, k_blocks[:, j], preferred_element_type=jnp.float32)
                scores = jnp.where(allowed[:, None, None], scores * scale, neg)
                new_max = jnp.maximum(running_max, scores.max(axis=-1))
                probs = jnp.exp(scores - new_max[..., None]) * allowed[:, None, None]
                rescale = jnp.exp(running_max - new_max)
                acc = acc * rescale[..., None] + jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v_blocks.dtype),
                                                            v_blocks[:, j], preferred_element_type=jnp.float32)
                return new_max, denom * rescale + probs.sum(axis=-1), acc

            return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry)

        stats = (batch, num_kv_heads, groups, block_q)
        init = (jnp.full(stats, neg, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros(stats + (head_dim,), jnp.float32))
        running_max, denom, acc = jax.lax.fori_loop(0, nk, key_block, init)
        empty = denom == 0
        out = acc / jnp.where(empty, 1.0, denom)[..., None]
        log_z = jnp.where(empty, 0.0, running_max + jnp.log(jnp.where(empty, 1.0, denom)))
        return out, log_z

    return jax.lax.map(query_block, jnp.arange(nq))


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _tiles(q_blocks, k_blocks, v_blocks, q_seg, q_slot, kv_seg, kv_slot, causal: bool, scale: float):
    return _tiles_forward(q_blocks, k_blocks, v_blocks, q_seg, q_slot, kv_seg, kv_slot, causal, scale)[0]


def _tiles_fwd(q_blocks, k_blocks, v_blocks, q_seg, q_slot, kv_seg, kv_slot, causal, scale):
    out, log_z = _tiles_forward(q_blocks, k_blocks, v_blocks, q_seg, q_slot, kv_seg, kv_slot, causal, scale)
    return out, (q_blocks, k_blocks, v_blocks, q_seg, q_slot, kv_seg, kv_slot, out, log_z)


def _tiles_bwd(causal, scale, residuals, d_out):
    """Flash-attention backward over the same tiles (skipping the same ones): probabilities recomputed from the
    saved logsumexp, so nothing of size [T, S] is kept between forward and backward."""
    q_blocks, k_blocks, v_blocks, q_seg, q_slot, kv_seg, kv_slot, out, log_z = residuals
    nq, nk = q_blocks.shape[1], k_blocks.shape[1]
    dtype = q_blocks.dtype
    delta = jnp.sum(d_out * out, axis=-1)  # [nq, B, K, G, bq]

    def query_block(carry, i):
        d_k, d_v = carry  # [B, nk, bk, K, d] f32
        q_i, g_i = q_blocks[:, i], d_out[i].astype(dtype)  # [B, bq, K, G, d], [B, K, G, bq, d]
        log_z_i, delta_i = log_z[i], delta[i]  # [B, K, G, bq]

        def key_block(j, inner):
            allowed = allowed_pairs(q_seg[:, i], q_slot[:, i], kv_seg[:, j], kv_slot[:, j], causal)

            def update(inner):
                d_q_i, d_k, d_v = inner
                k_j, v_j = k_blocks[:, j], v_blocks[:, j]  # [B, bk, K, d]
                scores = jnp.einsum("btkgd,bskd->bkgts", q_i, k_j, preferred_element_type=jnp.float32) * scale
                probs = jnp.where(allowed[:, None, None], jnp.exp(scores - log_z_i[..., None]), 0.0)  # [B,K,G,t,s]
                d_v_j = jnp.einsum("bkgts,bkgtd->bskd", probs.astype(dtype), g_i, preferred_element_type=jnp.float32)
                d_probs = jnp.einsum("bkgtd,bskd->bkgts", g_i, v_j, preferred_element_type=jnp.float32)
                d_scores = (probs * (d_probs - delta_i[..., None]) * scale).astype(dtype)
                d_q_i = d_q_i + jnp.einsum("bkgts,bskd->btkgd", d_scores, k_j, preferred_element_type=jnp.float32)
                d_k_j = jnp.einsum("bkgts,btkgd->bskd", d_scores, q_i, preferred_element_type=jnp.float32)
                d_k = jax.lax.dynamic_update_index_in_dim(d_k, d_k[:, j] + d_k_j, j, axis=1)
                d_v = jax.lax.dynamic_update_index_in_dim(d_v, d_v[:, j] + d_v_j, j, axis=1)
                return d_q_i, d_k, d_v

            return jax.lax.cond(jnp.any(allowed), update, lambda c: c, inner)

        init = (jnp.zeros(q_i.shape, jnp.float32), d_k, d_v)
        d_q_i, d_k, d_v = jax.lax.fori_loop(0, nk, key_block, init)
        return (d_k, d_v), d_q_i

    zeros_kv = jnp.zeros(k_blocks.shape, jnp.float32)
    (d_k, d_v), d_q = jax.lax.scan(query_block, (zeros_kv, zeros_kv), jnp.arange(nq))  # d_q [nq, B, bq, K, G, d]
    d_q = jnp.moveaxis(d_q, 0, 1)
    return (d_q.astype(dtype), d_k.astype(k_blocks.dtype), d_v.astype(v_blocks.dtype), None, None, None, None)


_tiles.defvjp(_tiles_fwd, _tiles_bwd)


def _blocked_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """Online-softmax attention over [BLOCK x BLOCK] tiles; tiles with no allowed pair are skipped (lax.cond),
    so causal masks, padding, empty cache slots and other segments' windows cost nothing. Same result as
    `_xla_attention` (rows with no allowed key give 0); its gradient is a flash-attention backward over the same
    tiles (`_tiles_bwd`)."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    # pad T and S to whole blocks: padded queries get segment -1 (they match nothing), padded keys segment 0
    q = _pad_to_block(q, 1, 0)
    k, v = _pad_to_block(k, 1, 0), _pad_to_block(v, 1, 0)
    q_seg, q_slot = _pad_to_block(mask.q_segment_ids, 1, -1), _pad_to_block(mask.q_slots, 1, 0)
    kv_seg, kv_slot = _pad_to_block(mask.kv_segment_ids, 1, 0), _pad_to_block(mask.kv_slots, 1, 0)
    nq, nk = q.shape[1] // BLOCK, k.shape[1] // BLOCK
    out = _tiles(q.reshape(batch, nq, BLOCK, num_kv_heads, groups, head_dim),
                 k.reshape(batch, nk, BLOCK, num_kv_heads, head_dim), v.reshape(batch, nk, BLOCK, num_kv_heads, head_dim),
                 q_seg.reshape(batch, nq, BLOCK).astype(jnp.int32), q_slot.reshape(batch, nq, BLOCK).astype(jnp.int32),
                 kv_seg.reshape(batch, nk, BLOCK).astype(jnp.int32), kv_slot.reshape(batch, nk, BLOCK).astype(jnp.int32),
                 mask.causal, float(scale))  # [nq, B, K, G, bq, d]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, nq * BLOCK, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)


def _cudnn_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    allowed = mask.dense()[:, None, :, :]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale, implementation="cudnn")
    any_allowed = jnp.any(allowed, axis=-1)[:, 0, :, None, None]  # [B, T, 1, 1]
    return jnp.where(any_allowed, out, 0).astype(q.dtype)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, scale: float | None = None, backend: str = "xla",
    platform: str = "auto",
) -> jax.Array:
    """Scaled dot-product attention with GQA, in a program for `platform` (module docstring).

    q [B, T, H, d], k/v [B, S, K, d] with H % K == 0 (query head h reads kv head h // (H/K)).
    Returns [B, T, H, d] in q's dtype; softmax in float32.
    """
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "xla":
        if _use_blocked(q, k, mask, platform):
            return _blocked_attention(q, k, v, mask, scale)
        if _use_decode(q, platform):
            return _decode_attention(q, k, v, mask, scale)
        return _xla_attention(q, k, v, mask, scale)
    if backend == "cudnn":
        return _cudnn_attention(q, k, v, mask, scale)
    if backend == "pallas":
        if mask.allowed is not None:
            # Dense extra masks are not block-sparse; the xla path is the right tool for them.
            return _xla_attention(q, k, v, mask, scale)
        from omni_jax.kernels.pallas_attention import pallas_attention

        return pallas_attention(
            q, k, v,
            q_segment_ids=mask.q_segment_ids, kv_segment_ids=mask.kv_segment_ids,
            q_positions=mask.q_slots, kv_positions=mask.kv_slots,
            causal=mask.causal, scale=scale, platform=platform,
        )
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def cached_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer_index, cache_dtype,
                     mask: AttentionMask, *, scale: float, backend: str = "xla", platform: str = "auto") -> jax.Array:
    """`attention` of q [B, T, H, d] over layer `layer_index` of stacked caches [L, B, S, K, d] (KVCache storage:
    `storage_dtype(cache_dtype, platform)`), keys and values read as q's dtype.

    Decode steps (T = 1) in a CPU program run on `omni_jax.kernels.cache_attention`, which reads the layer where it lies
    (no per-layer copy into the dot's layout), and only up to the last slot any row attends to (the preallocated
    slots beyond it are not read); the masked softmax is `_xla_attention`'s, probabilities rounded to q's dtype
    as there. Elsewhere the layer is sliced and `attention` runs."""
    if (backend == "xla" and q.shape[1] == 1 and jnp.dtype(cache_dtype) == q.dtype
            and cache_attention.use_kernel(q.shape[2], cache_k, cache_dtype, platform)):
        allowed = mask.dense()[:, 0, None, :]  # [B, 1, S]
        slots = jax.lax.broadcasted_iota(jnp.int32, allowed.shape, 2)
        limit = jnp.max(jnp.where(allowed, slots + 1, 0))  # one past the last slot any row attends to
        logits = cache_attention.scores(q[:, 0], cache_k, layer_index, limit) * scale  # [B, H, S]
        probs = _masked_probs(logits, allowed, -1, q.dtype)  # 0 at and beyond limit
        return cache_attention.mix(probs, cache_v, layer_index, limit)[:, None].astype(q.dtype)  # [B, 1, H, d]
    k = from_storage(cache_k[layer_index], cache_dtype).astype(q.dtype)  # [B, S, K, d]
    v = from_storage(cache_v[layer_index], cache_dtype).astype(q.dtype)
    return attention(q, k, v, mask, scale=scale, backend=backend, platform=platform)
