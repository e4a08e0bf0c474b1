"""Attention of new query tokens over a paged KV cache, and the writes of their keys/values into it.

The cache of one layer is a pool of fixed-size pages, `pages [N, P, 2K, d]`: page n holds P token slots, each
with the K key heads and K value heads interleaved on one axis (k0, v0, k1, v1, ...), the layout of jax's
`ragged_paged_attention` TPU kernel. A row (one request) owns the pages its page table lists, `page_table [B, M]`,
in order: the token at cache index i of row b sits in page `page_table[b, i // P]` at offset `i % P`. Page 0 is
the pool's scratch page: padded query tokens and idle rows write there and never read it.

Queries are new tokens appended to their rows: q [B, T, H, d], where `q_lens [B]` of the T are real (the rest
padding, at the end) and `kv_lens [B]` is each row's length after this call's tokens are written (so real query
t of row b sits at cache index kv_lens[b] - q_lens[b] + t and attends cache indices <= its own, causally).

Paths, chosen by the program's target (`omni_jax.kernels.target`):
  * "tpu": `jax.experimental.pallas.ops.tpu.ragged_paged_attention` (Mosaic). Its ragged layout takes the
    queries of all rows flattened; here that is either one row of T tokens (a prefill chunk) or B rows of one
    token (a decode step).
  * elsewhere: XLA. Each row's pages are gathered into a contiguous [B, M*P, 2K, d] view and the masked attention
    of `omni_jax.models.attention` runs over it (on the CPU its decode and blocked paths).
Under a mesh (`jax.set_mesh`) both run in a `jax.shard_map`: rows and the page pool split over the batch axes
(each shard owns its own pages, and page tables hold shard-local page ids), kv heads over the head axes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from omni_jax.kernels import target

SCRATCH_PAGE = 0  # every pool's page 0 (per shard under a mesh) takes writes that must land nowhere


def cache_slots(page_table: jax.Array, kv_lens: jax.Array, q_lens: jax.Array, num_tokens: int,
                page_size: int) -> jax.Array:
    """Flat pool slots [B, T] (page * P + offset) where the T new tokens of each row are written; padded tokens
    (t >= q_lens) go to the scratch page."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)[None, :]  # [1, T]
    index = (kv_lens - q_lens)[:, None] + t  # [B, T] cache index of each new token
    real = t < q_lens[:, None]
    page = jnp.take_along_axis(page_table, jnp.clip(index // page_size, 0, page_table.shape[1] - 1), axis=1)
    return jnp.where(real, page * page_size + index % page_size, SCRATCH_PAGE * page_size).astype(jnp.int32)


def write_pages(pages: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array) -> jax.Array:
    """pages [N, P, 2K, d] with k/v [B, T, K, d] written at flat slots [B, T] (values cast to the pool's dtype)."""
    n, p, kk, d = pages.shape
    kv = jnp.stack([k, v], axis=3).reshape(-1, kk, d).astype(pages.dtype)  # [B*T, 2K, d], k/v interleaved
    flat = pages.reshape(n * p, kk, d).at[slots.reshape(-1)].set(kv, mode="drop", unique_indices=False)
    return flat.reshape(n, p, kk, d)


def _xla_paged_attention(q, pages, page_table, kv_lens, q_lens, *, scale: float, cache_dtype, platform: str):
    """Gather each row's pages into a contiguous cache and attend over it with models.attention's
    `cached_attention` (one layer): in a CPU program a decode step then runs on the CPU cache-attention kernel,
    which reads only up to the last slot any row attends to."""
    from omni_jax.models.attention import AttentionMask, cached_attention

    batch, t, _, _ = q.shape
    _, p, kk, d = pages.shape
    m = page_table.shape[1]
    view = pages[page_table].reshape(batch, m * p, kk, d)  # [B, S = M*P, 2K, d] in the pool's storage dtype
    k, v = view[None, :, :, 0::2], view[None, :, :, 1::2]  # [1, B, S, K, d]: a one-layer stacked cache
    token = jnp.arange(t, dtype=jnp.int32)[None, :]
    q_slots = (kv_lens - q_lens)[:, None] + token  # [B, T] cache index of each query
    q_seg = (token < q_lens[:, None]).astype(jnp.int32)  # padded queries: segment 0 (attend nothing)
    kv_slots = jnp.broadcast_to(jnp.arange(m * p, dtype=jnp.int32), (batch, m * p))
    kv_seg = (kv_slots < kv_lens[:, None]).astype(jnp.int32)
    mask = AttentionMask(q_seg, kv_seg, q_slots, kv_slots, causal=True)
    return cached_attention(q, k, v, 0, cache_dtype, mask, scale=scale, backend="xla", platform=platform)


def _target_device_kind() -> str:
    """The device kind of the program's target: the mesh's (an AOT compile for a slice from a CPU host), else the
    first device's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    kind = getattr(device, "device_kind", None)
    return kind or jax.devices()[0].device_kind


def kernel_block_sizes(q, pages, page_table) -> tuple[int, int]:
    """(kv pages, queries) per block of the ragged kernel, from jax's table of tuned sizes for the target's TPU
    generation. The kernel's own lookup reads `jax.devices()`, which is this host's CPU in an AOT compile, and its
    fallback (128 pages a block) overflows VMEM at 64-token pages; so: the tuned entry of this key, else the tuned
    entry with the same heads, head size and page size nearest in batched tokens and longest in row length not
    above this one's, else blocks of 1024 tokens and 32 queries."""
    import math

    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel, tuned_block_sizes as tuned

    name = " ".join(_target_device_kind().split()[:2])  # "TPU v5 lite" -> "TPU v5"
    heads_q, heads_kv = kernel.get_min_heads_per_blk(q.shape[1], pages.shape[2], q.dtype, pages.dtype)
    key = tuned.simplify_key((q.dtype, pages.dtype, heads_q, heads_kv // 2, q.shape[2], pages.shape[1], q.shape[0],
                              page_table.shape[1]))
    table = tuned.TUNED_BLOCK_SIZES.get(name, {})
    if key in table:
        pages_per_block, queries_per_block = table[key]
    else:
        near = [(abs(math.log2(k[6]) - math.log2(key[6])), -k[7], v) for k, v in table.items()
                if k[:6] == key[:6] and k[7] <= key[7]]
        pages_per_block, queries_per_block = min(near)[2] if near else (max(1, 1024 // pages.shape[1]), 32)
    return min(page_table.shape[1], pages_per_block), min(q.shape[0], queries_per_block)


def _tpu_paged_attention(q, pages, page_table, kv_lens, q_lens, *, scale: float):
    """The ragged paged attention kernel on one row of T tokens or B rows of one token."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    batch, t, h, d = q.shape
    if d % 128:
        raise ValueError(f"jax's ragged paged attention kernel needs a head size that is a multiple of 128 (TPU "
                         f"lanes); this model's is {d}")
    if batch > 1 and t > 1:
        raise ValueError(f"paged attention on TPU takes one row of tokens or rows of one token; got {q.shape}")
    flat_q = q.reshape(batch * t, h, d)
    if batch == 1:  # one sequence whose first q_lens[0] queries are real
        cu_q_lens = jnp.stack([jnp.zeros((), jnp.int32), q_lens[0]]).astype(jnp.int32)
        num_seqs = jnp.ones((1,), jnp.int32)
    else:  # one query per row; idle rows (q_len 0) attend their scratch slot and are ignored by the caller
        cu_q_lens = jnp.arange(batch + 1, dtype=jnp.int32)
        num_seqs = jnp.full((1,), batch, jnp.int32)
    lens = jnp.maximum(kv_lens, 1).astype(jnp.int32)
    pages = pages.astype(q.dtype) if pages.dtype != q.dtype else pages
    pages_per_block, queries_per_block = kernel_block_sizes(flat_q, pages, page_table)
    # The kernel's dots take the operands' own precision: a 16-bit cache is a bf16 x bf16 MXU product with float32
    # sums; a process-wide "highest" (as the tests set) would ask Mosaic for fp32 passes over bf16 and fail.
    precision = "default" if jnp.dtype(pages.dtype).itemsize == 2 else "highest"
    with jax.default_matmul_precision(precision):
        out = ragged_paged_attention(flat_q, pages, lens, page_table.astype(jnp.int32), cu_q_lens, num_seqs,
                                     sm_scale=scale, num_kv_pages_per_block=pages_per_block,
                                     num_queries_per_block=queries_per_block)
    return out.reshape(batch, t, h, d)


def _local(q, k, v, pages, page_table, kv_lens, q_lens, *, scale: float, cache_dtype, platform: str):
    """One shard: write the new keys/values (already in the pool's storage dtype), then attend. Returns
    (out [B, T, H, d], pages)."""
    slots = cache_slots(page_table, kv_lens, q_lens, q.shape[1], pages.shape[1])
    pages = write_pages(pages, k, v, slots)
    if target.resolve_platform(platform) == "tpu":
        out = _tpu_paged_attention(q, pages, page_table, kv_lens, q_lens, scale=scale)
    else:
        out = _xla_paged_attention(q, pages, page_table, kv_lens, q_lens, scale=scale, cache_dtype=cache_dtype,
                                   platform=platform)
    return out, pages


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, pages: jax.Array, page_table: jax.Array,
                    kv_lens: jax.Array, q_lens: jax.Array, *, scale: float, cache_dtype=None,
                    platform: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Write k/v [B, T, K, d] of the new tokens into `pages` [N, P, 2K, d] and attend q [B, T, H, d] over each
    row's cache (module docstring). k/v come in the pool's storage dtype (`models.kv_cache.to_storage`: on the
    CPU a 16-bit cache holds its bits) and are read back as `cache_dtype` (default: the pool's dtype).
    Returns (out [B, T, H, d] in q's dtype, the updated pages)."""
    cache_dtype = pages.dtype if cache_dtype is None else jnp.dtype(cache_dtype)
    local = functools.partial(_local, scale=float(scale), cache_dtype=cache_dtype, platform=platform)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
        return local(q, k, v, pages, page_table, kv_lens, q_lens)
    from omni_jax.kernels.pallas_attention import shard_axes

    batch_axes, head_axes = shard_axes(mesh, pages.shape[0], k.shape[2])  # the pool's split decides the rows'
    shards = 1
    for axis in (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,) if batch_axes else ()):
        shards *= mesh.shape[axis]
    if q.shape[0] % shards:
        raise ValueError(f"paged attention: {q.shape[0]} rows do not split over the {shards} shards of the page pool "
                         f"(mesh axes {batch_axes}); pad the rows to a multiple of {shards}")
    heads = PartitionSpec(batch_axes, None, head_axes, None)  # q, k, v [B, T, heads, d]; pages [N, P, 2K, d]
    rows = PartitionSpec(batch_axes)
    sharded = jax.shard_map(local, mesh=mesh,
                            in_specs=(heads, heads, heads, heads, PartitionSpec(batch_axes, None), rows, rows),
                            out_specs=(heads, heads), check_vma=False)
    return sharded(q, k, v, pages, page_table, kv_lens, q_lens)
