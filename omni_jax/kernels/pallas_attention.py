"""Pallas (TPU / Mosaic) flash-attention kernel: the ``pallas`` backend of ``omni_jax.models.attention``.

One entry point, :func:`pallas_attention`, with the mask form used by the whole model:

    allowed[b, t, s] = (q_seg[b, t] == kv_seg[b, s]) & (kv_seg[b, s] != 0)
                       & (not causal or kv_pos[b, s] <= q_pos[b, t])

Why a hand-written kernel rather than ``splash_attention``: splash takes its mask as a *static*
numpy object (the block-sparsity tables are built at trace time), per example (vmapped over batch),
and its causal mask is on array indices. Our masks carry *per-batch, traced* positions (KV-cache
decode with a different fill level per row, left padding, TMRoPE-style position ids), which splash
cannot express without a dense [T, S] mask per example. Splash also needs block sizes that are
multiples of 128. So this module implements its own blocked online-softmax kernel whose block
sparsity is computed at run time from per-block min/max statistics of the segment ids and positions.

Kernel structure (all three kernels share it):

* Layout: q -> [B, K, G, T, d] (G = H // K query heads per kv head), k/v -> [B, K, S, d]. One grid
  step holds the G query heads of a kv head, so every K/V tile fetched from HBM is used G times
  (GQA-aware; decode with T=1 still gets G rows per kv tile).
* Grid (B, K, q-block, kv-block) for the forward and dq kernels, (B, K, kv-block, q-block) for the
  dk/dv kernel; the last axis is the sequential ("arbitrary") reduction axis with f32 VMEM scratch
  accumulators.
* Block skipping: per-block statistics (min non-zero segment, max segment, min/max positions) are
  scalar-prefetched into SMEM. A (q-block, kv-block) pair is skipped when the segment ranges cannot
  overlap, the kv block is all padding, or (causal) the smallest valid kv position exceeds the
  largest valid query position. Besides skipping the compute, the kv index map clamps the block index
  to the [first, last] active kv block of the current query block, so skipped blocks outside that
  range do not even DMA (the pipeline does not re-fetch an unchanged block index).
* Blocks that are fully allowed (single shared non-zero segment, and causal-wise entirely in the
  past) run without building the mask at all.
* Softmax statistics in f32, masked probabilities are forced to exactly 0, rows without any allowed
  key produce 0 (l == 0 guard).

Backward: a real Pallas backward (FlashAttention-2 style, recomputing probabilities from the saved
per-row logsumexp): one kernel for dq (grid over q blocks, loop over kv blocks) and one for dk/dv
(grid over kv blocks, loop over q blocks, summing the G query heads of the group in-kernel). Both use
the same block skipping. Memory: O(B*H*T) residuals (logsumexp) besides q/k/v/o; nothing O(T*S).

Target: ``platform`` (``omni_jax.kernels.target``) picks how the kernels run: in Pallas interpret mode (plain
XLA ops) in a CPU program, compiled by Mosaic for TPU otherwise; ``interpret`` overrides it. GPU is not
supported by this kernel (use the ``cudnn`` backend).

Sharding: a Mosaic kernel cannot be partitioned by XLA's SPMD partitioner, so under a mesh of several devices
(``jax.set_mesh``, read at trace time with ``jax.sharding.get_abstract_mesh()``) the whole differentiable
function, forward and backward kernels, runs inside one ``jax.shard_map``: each device attends its own rows and
kv-head groups. Dims are split as the logical rule table splits the activations (``omni_jax.sharding.rules``;
the rules of ``nn.logical_axis_rules`` when set): batch by ``activation_batch`` (data, fsdp), kv heads by
``activation_kv_heads`` (tensor), and the query heads with their kv heads so that every GQA group stays on one
device. A mesh axis is used only where its size (times the axes already chosen for that dim) divides the dim
(``omni_jax.sharding.spec_for``); a dim no axis divides is not split (each device then holds all of it and its
share of the work is repeated on the devices along the unused axes; results are equal). Segment ids and
positions split with the batch; sequence lengths are never split. The same ``shard_map`` wraps the
interpret-mode kernels on the CPU. Without a mesh, or with one device, the kernel is called directly.

Decode (one query per row, T = 1) runs this kernel with the query padded to one sublane tile; the block skipping
keeps it to the cache slots in use. A dedicated TPU decode kernel (jax's ``ragged_paged_attention``) needs the
KV cache in pages (a serving change of ``omni_jax.models.kv_cache``), which is not done.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from omni_jax.kernels import target
from omni_jax.sharding.partition import spec_for
from omni_jax.sharding.rules import LOGICAL_AXIS_RULES

__all__ = ["pallas_attention"]

NUM_LANES = 128
NUM_SUBLANES = 8
# Finite "minus infinity" for masked logits (as jax's TPU flash attention): keeps the online
# softmax free of inf - inf NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# logsumexp stored for rows without any allowed key: exp(s - LSE_EMPTY) == 0.
LSE_EMPTY = 0.7 * float(np.finfo(np.float32).max)
_I32_MAX = int(np.iinfo(np.int32).max)
_I32_MIN = int(np.iinfo(np.int32).min)

# Per-block statistics (int32, flattened [B * n_blocks * N_STATS] in SMEM).
_SEG_LO_NZ = 0   # min over rows with non-zero segment id (I32_MAX if none)
_SEG_MAX = 1     # max segment id over all rows
_SEG_MIN = 2     # min segment id over all rows
_POS_VALID = 3   # q: max position over valid rows (I32_MIN if none); kv: min (I32_MAX if none)
_POS_ALL = 4     # q: min position over all rows; kv: max position over all rows
N_STATS = 5

_NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T


class _Cfg(NamedTuple):
    causal: bool
    scale: float
    groups: int
    block_q: int
    block_kv: int
    interpret: bool


# ----------------------------------------------------------------------------- small helpers


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _lanes(x, n: int):
    """x: [rows, 128] with all lanes equal -> [rows, n]."""
    if n % NUM_LANES == 0:
        return x if n == NUM_LANES else jnp.tile(x, (1, n // NUM_LANES))
    if n < NUM_LANES:
        return x[:, :n]
    return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _precision(x):
    """The precision of the kernels' products of `x`'s dtype: float32 operands take the configured default;
    16-bit operands DEFAULT (one pass, exact products), set explicitly so that a global
    `jax_default_matmul_precision` of "highest" (the tests set it) does not ask Mosaic for an fp32 contraction of
    bfloat16 operands, which it rejects ("Bad lhs type")."""
    return None if x.dtype == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b):
    """a [m, k] @ b [k, n] -> [m, n] float32."""
    return lax.dot(a, b, precision=_precision(a), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
    """a [m, k] @ b[n, k].T -> [m, n] float32."""
    return lax.dot_general(a, b, _NT_DIMS, precision=_precision(a), preferred_element_type=jnp.float32)


def _block_mask(row_seg, row_pos, col_seg, col_pos, *, rows_are_q: bool, causal: bool):
    """Allowed-mask of one tile.

    row_seg/row_pos: [R, 128] lane-broadcast columns (one value per row).
    col_seg/col_pos: [8, C] sublane-broadcast rows (one value per column).
    Returns bool [R, C].
    """
    n_cols = col_seg.shape[1]
    rs = _lanes(row_seg, n_cols)
    cs = col_seg[:1, :]
    mask = rs == cs
    kv_seg = cs if rows_are_q else rs
    mask = jnp.logical_and(mask, kv_seg != 0)
    if causal:
        rp = _lanes(row_pos, n_cols)
        cp = col_pos[:1, :]
        mask = jnp.logical_and(mask, (cp <= rp) if rows_are_q else (rp <= cp))
    return mask


def _block_flags(qst_ref, kst_ref, qb, kb, causal: bool):
    """(may_have_allowed_pairs, all_pairs_allowed) for q block qb and kv block kb (flat indices)."""
    qo, ko = qb * N_STATS, kb * N_STATS
    q_lo, q_max, q_min = qst_ref[qo + _SEG_LO_NZ], qst_ref[qo + _SEG_MAX], qst_ref[qo + _SEG_MIN]
    k_lo, k_max, k_min = kst_ref[ko + _SEG_LO_NZ], kst_ref[ko + _SEG_MAX], kst_ref[ko + _SEG_MIN]
    active = jnp.logical_and(q_lo <= k_max, k_lo <= q_max)
    full = jnp.logical_and(
        jnp.logical_and(q_min == q_max, k_min == k_max),
        jnp.logical_and(q_max == k_max, q_max != 0))
    if causal:
        active = jnp.logical_and(active, kst_ref[ko + _POS_VALID] <= qst_ref[qo + _POS_VALID])
        full = jnp.logical_and(full, kst_ref[ko + _POS_ALL] <= qst_ref[qo + _POS_ALL])
    return active, full


def _stats(seg, pos, block: int, is_q: bool):
    """seg/pos [B, N] (N % block == 0) -> flat int32 [B * N // block * N_STATS]."""
    b, n = seg.shape
    seg = seg.reshape(b, n // block, block)
    pos = pos.reshape(b, n // block, block)
    nz = seg != 0
    seg_lo = jnp.min(jnp.where(nz, seg, _I32_MAX), axis=-1)
    seg_max = jnp.max(seg, axis=-1)
    seg_min = jnp.min(seg, axis=-1)
    if is_q:
        pos_valid = jnp.max(jnp.where(nz, pos, _I32_MIN), axis=-1)
        pos_all = jnp.min(pos, axis=-1)
    else:
        pos_valid = jnp.min(jnp.where(nz, pos, _I32_MAX), axis=-1)
        pos_all = jnp.max(pos, axis=-1)
    st = jnp.stack([seg_lo, seg_max, seg_min, pos_valid, pos_all], axis=-1)
    return st.astype(jnp.int32).reshape(-1)


def _active_ranges(qst, kst, batch, nq, nk, causal):
    """First/last active kv block per q block ([B*nq*2]) and first/last q block per kv block."""
    q = qst.reshape(batch, nq, 1, N_STATS)
    k = kst.reshape(batch, 1, nk, N_STATS)
    act = jnp.logical_and(q[..., _SEG_LO_NZ] <= k[..., _SEG_MAX], k[..., _SEG_LO_NZ] <= q[..., _SEG_MAX])
    if causal:
        act = jnp.logical_and(act, k[..., _POS_VALID] <= q[..., _POS_VALID])

    def rng(a):  # a [..., n] bool -> [..., 2] (first, last), (0, 0) if none
        n = a.shape[-1]
        first = jnp.argmax(a, axis=-1)
        last = n - 1 - jnp.argmax(a[..., ::-1], axis=-1)
        anyv = jnp.any(a, axis=-1)
        return jnp.stack([jnp.where(anyv, first, 0), jnp.where(anyv, last, 0)], -1).astype(jnp.int32)

    return rng(act).reshape(-1), rng(jnp.swapaxes(act, 1, 2)).reshape(-1)


def _col(x):   # [B, N] -> [B, N, 128] (value per row, lane-broadcast)
    return jnp.broadcast_to(x[:, :, None], (*x.shape, NUM_LANES))


def _row(x):   # [..., N] -> [..., 8, N] (value per column, sublane-broadcast)
    return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], NUM_SUBLANES, x.shape[-1]))


def _compiler_params(n_parallel: int):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(qst_ref, kst_ref, qrng_ref, krng_ref,          # scalar prefetch (SMEM)
                q_ref, k_ref, v_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref,
                o_ref, lse_ref,
                m_sc, l_sc, acc_sc,
                *, cfg: _Cfg, nq: int, nk: int):
    del krng_ref
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qb, kb = b * nq + i, b * nk + j
    bkv, d = k_ref.shape

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    active, full = _block_flags(qst_ref, kst_ref, qb, kb, cfg.causal)
    in_range = jnp.logical_and(j >= qrng_ref[2 * qb], j <= qrng_ref[2 * qb + 1])
    run = jnp.logical_and(in_range, active)

    def body(masked: bool):
        k = k_ref[...]
        v = v_ref[...]
        mask = None
        if masked:
            mask = _block_mask(qseg_ref[...], qpos_ref[...], kseg_ref[...], kpos_ref[...],
                               rows_are_q=True, causal=cfg.causal)
        for g in range(cfg.groups):
            s = _dot_nt(q_ref[g], k)
            s = s * cfg.scale
            if masked:
                s = jnp.where(mask, s, MASK_VALUE)
            m_prev = m_sc[g]                                      # [bq, 128]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - _lanes(m_next, bkv))
            if masked:
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_sc[g] = alpha * l_sc[g] + jnp.sum(p, axis=1, keepdims=True)
            m_sc[g] = m_next
            pv = _dot(p.astype(v.dtype), v)
            acc_sc[g] = acc_sc[g] * _lanes(alpha, d) + pv

    @pl.when(jnp.logical_and(run, full))
    def _run_full():
        body(masked=False)

    @pl.when(jnp.logical_and(run, jnp.logical_not(full)))
    def _run_masked():
        body(masked=True)

    @pl.when(j == nk - 1)
    def _finalize():
        for g in range(cfg.groups):
            l = l_sc[g]
            empty = l == 0.0
            inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
            o_ref[g] = (acc_sc[g] * _lanes(inv, d)).astype(o_ref.dtype)
            if lse_ref is not None:
                lse_ref[g] = jnp.where(empty, LSE_EMPTY, m_sc[g] + jnp.log(jnp.where(empty, 1.0, l)))


def _prefetch_args(meta):
    return (meta["qst"], meta["kst"], meta["qrng"], meta["krng"])


def _fwd_call(q5, k4, v4, meta, cfg: _Cfg, save_lse: bool):
    batch, kh, groups, tp, d = q5.shape
    sp = k4.shape[2]
    bq, bkv = cfg.block_q, cfg.block_kv
    nq, nk = tp // bq, sp // bkv

    def q_map(b, h, i, j, qst, kst, qrng, krng):
        return (b, h, 0, i, 0)

    def kv_map(b, h, i, j, qst, kst, qrng, krng):
        qb = b * nq + i
        return (b, h, jnp.clip(j, qrng[2 * qb], qrng[2 * qb + 1]), 0)

    def qmeta_map(b, h, i, j, qst, kst, qrng, krng):
        return (b, i, 0)

    def kmeta_map(b, h, i, j, qst, kst, qrng, krng):
        qb = b * nq + i
        return (b, 0, jnp.clip(j, qrng[2 * qb], qrng[2 * qb + 1]))

    q_spec = pl.BlockSpec((None, None, groups, bq, d), q_map)
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_map)
    qmeta_spec = pl.BlockSpec((None, bq, NUM_LANES), qmeta_map)
    kmeta_spec = pl.BlockSpec((None, NUM_SUBLANES, bkv), kmeta_map)

    out_shape = [jax.ShapeDtypeStruct(q5.shape, q5.dtype)]
    out_specs = [q_spec]
    if save_lse:
        out_shape.append(jax.ShapeDtypeStruct((batch, kh, groups, tp, NUM_LANES), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, groups, bq, NUM_LANES), q_map))
    else:
        out_shape.append(None)
        out_specs.append(None)

    kernel = functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk)
    flops = 4 * batch * kh * groups * tp * sp * d
    itemsize = q5.dtype.itemsize
    cost = pl.CostEstimate(
        flops=flops, transcendentals=batch * kh * groups * tp * sp,
        bytes_accessed=int(itemsize * (2 * q5.size + nq * (k4.size + v4.size))))
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, kh, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, qmeta_spec, qmeta_spec, kmeta_spec, kmeta_spec],
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((groups, bq, NUM_LANES), jnp.float32),
                pltpu.VMEM((groups, bq, NUM_LANES), jnp.float32),
                pltpu.VMEM((groups, bq, d), jnp.float32),
            ]),
        out_shape=out_shape,
        compiler_params=_compiler_params(3),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="omni_flash_fwd",
    )(*_prefetch_args(meta), q5, k4, v4,
      _col(meta["qseg"]), _col(meta["qpos"]), _row(meta["kseg"]), _row(meta["kpos"]))
    return o, (None if lse is None else lse[..., 0])


# ----------------------------------------------------------------------------- backward kernels
# Both backward kernels work on transposed score tiles sT = k @ q.T ([bkv, bq]) so that the per-query
# statistics (logsumexp, di) are lane-major [8, bq] rows and the per-key metadata are [bkv, 128]
# columns; dk/dv = sT-shaped @ q/do, dq = dsT.T @ k.


def _bwd_tile(q, k, v, do, lse_row, di_row, mask, scale):
    """Recompute one tile: returns (p [bkv,bq] f32, dsT [bkv,bq] f32) for one query head."""
    s = _dot_nt(k, q) * scale
    p = jnp.exp(s - lse_row)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot_nt(v, do)
    ds = p * (dp - di_row)
    return p, ds


def _dkv_kernel(qst_ref, kst_ref, qrng_ref, krng_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref,
                dk_ref, dv_ref,
                dk_sc, dv_sc,
                *, cfg: _Cfg, nq: int, nk: int):
    del qrng_ref
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qb, kb = b * nq + i, b * nk + j

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    active, full = _block_flags(qst_ref, kst_ref, qb, kb, cfg.causal)
    in_range = jnp.logical_and(i >= krng_ref[2 * kb], i <= krng_ref[2 * kb + 1])
    run = jnp.logical_and(in_range, active)

    def body(masked: bool):
        k = k_ref[...]
        v = v_ref[...]
        mask = None
        if masked:
            mask = _block_mask(kseg_ref[...], kpos_ref[...], qseg_ref[...], qpos_ref[...],
                               rows_are_q=False, causal=cfg.causal)
        dk = None
        dv = None
        for g in range(cfg.groups):
            q = q_ref[g]
            do = do_ref[g]
            p, ds = _bwd_tile(q, k, v, do, lse_ref[g][:1, :], di_ref[g][:1, :], mask, cfg.scale)
            dv_g = _dot(p.astype(do.dtype), do)
            dk_g = _dot(ds.astype(q.dtype), q)
            dv = dv_g if dv is None else dv + dv_g
            dk = dk_g if dk is None else dk + dk_g
        dv_sc[...] += dv
        dk_sc[...] += dk

    @pl.when(jnp.logical_and(run, full))
    def _run_full():
        body(masked=False)

    @pl.when(jnp.logical_and(run, jnp.logical_not(full)))
    def _run_masked():
        body(masked=True)

    @pl.when(i == nq - 1)
    def _finalize():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(qst_ref, kst_ref, qrng_ref, krng_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref,
               dq_ref,
               dq_sc,
               *, cfg: _Cfg, nq: int, nk: int):
    del krng_ref
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qb, kb = b * nq + i, b * nk + j

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    active, full = _block_flags(qst_ref, kst_ref, qb, kb, cfg.causal)
    in_range = jnp.logical_and(j >= qrng_ref[2 * qb], j <= qrng_ref[2 * qb + 1])
    run = jnp.logical_and(in_range, active)

    def body(masked: bool):
        k = k_ref[...]
        v = v_ref[...]
        mask = None
        if masked:
            mask = _block_mask(kseg_ref[...], kpos_ref[...], qseg_ref[...], qpos_ref[...],
                               rows_are_q=False, causal=cfg.causal)
        for g in range(cfg.groups):
            _, ds = _bwd_tile(q_ref[g], k, v, do_ref[g], lse_ref[g][:1, :], di_ref[g][:1, :], mask,
                              cfg.scale)
            dq_sc[g] += _dot(ds.T.astype(k.dtype), k)

    @pl.when(jnp.logical_and(run, full))
    def _run_full():
        body(masked=False)

    @pl.when(jnp.logical_and(run, jnp.logical_not(full)))
    def _run_masked():
        body(masked=True)

    @pl.when(j == nk - 1)
    def _finalize():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _bwd_call(q5, k4, v4, o5, lse, do5, meta, cfg: _Cfg):
    batch, kh, groups, tp, d = q5.shape
    sp = k4.shape[2]
    bq, bkv = cfg.block_q, cfg.block_kv
    nq, nk = tp // bq, sp // bkv

    di = jnp.sum(o5.astype(jnp.float32) * do5.astype(jnp.float32), axis=-1)   # [B, K, G, Tp]
    lse_r, di_r = _row(lse), _row(di)                                          # [B, K, G, 8, Tp]
    qseg_r, qpos_r = _row(meta["qseg"]), _row(meta["qpos"])                    # [B, 8, Tp]
    kseg_c, kpos_c = _col(meta["kseg"]), _col(meta["kpos"])                    # [B, Sp, 128]
    operands = (q5, k4, v4, do5, lse_r, di_r, qseg_r, qpos_r, kseg_c, kpos_c)

    # ---- dk, dv: grid (b, h, kv block j, q block i); q-side blocks clamped to the active q range.
    def dkv_qidx(b, j, i, krng):
        kb = b * nk + j
        return jnp.clip(i, krng[2 * kb], krng[2 * kb + 1])

    def q_map_kv(b, h, j, i, qst, kst, qrng, krng):
        return (b, h, 0, dkv_qidx(b, j, i, krng), 0)

    def stat_map_kv(b, h, j, i, qst, kst, qrng, krng):
        return (b, h, 0, 0, dkv_qidx(b, j, i, krng))

    def qmeta_map_kv(b, h, j, i, qst, kst, qrng, krng):
        return (b, 0, dkv_qidx(b, j, i, krng))

    def kv_map_kv(b, h, j, i, qst, kst, qrng, krng):
        return (b, h, j, 0)

    def kmeta_map_kv(b, h, j, i, qst, kst, qrng, krng):
        return (b, j, 0)

    q_spec = pl.BlockSpec((None, None, groups, bq, d), q_map_kv)
    stat_spec = pl.BlockSpec((None, None, groups, NUM_SUBLANES, bq), stat_map_kv)
    qmeta_spec = pl.BlockSpec((None, NUM_SUBLANES, bq), qmeta_map_kv)
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_map_kv)
    kmeta_spec = pl.BlockSpec((None, bkv, NUM_LANES), kmeta_map_kv)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, kh, nk, nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                      qmeta_spec, qmeta_spec, kmeta_spec, kmeta_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k4.dtype), jax.ShapeDtypeStruct(v4.shape, v4.dtype)],
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        name="omni_flash_bwd_dkv",
    )(*_prefetch_args(meta), *operands)

    # ---- dq: grid (b, h, q block i, kv block j); kv-side blocks clamped to the active kv range.
    def dq_kidx(b, i, j, qrng):
        qb = b * nq + i
        return jnp.clip(j, qrng[2 * qb], qrng[2 * qb + 1])

    def q_map_q(b, h, i, j, qst, kst, qrng, krng):
        return (b, h, 0, i, 0)

    def stat_map_q(b, h, i, j, qst, kst, qrng, krng):
        return (b, h, 0, 0, i)

    def qmeta_map_q(b, h, i, j, qst, kst, qrng, krng):
        return (b, 0, i)

    def kv_map_q(b, h, i, j, qst, kst, qrng, krng):
        return (b, h, dq_kidx(b, i, j, qrng), 0)

    def kmeta_map_q(b, h, i, j, qst, kst, qrng, krng):
        return (b, dq_kidx(b, i, j, qrng), 0)

    q_spec = pl.BlockSpec((None, None, groups, bq, d), q_map_q)
    stat_spec = pl.BlockSpec((None, None, groups, NUM_SUBLANES, bq), stat_map_q)
    qmeta_spec = pl.BlockSpec((None, NUM_SUBLANES, bq), qmeta_map_q)
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_map_q)
    kmeta_spec = pl.BlockSpec((None, bkv, NUM_LANES), kmeta_map_q)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, kh, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                      qmeta_spec, qmeta_spec, kmeta_spec, kmeta_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((groups, bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        name="omni_flash_bwd_dq",
    )(*_prefetch_args(meta), *operands)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q5, k4, v4, meta, cfg: _Cfg):
    return _fwd_call(q5, k4, v4, meta, cfg, save_lse=False)[0]


def _flash_fwd(q5, k4, v4, meta, cfg: _Cfg):
    o, lse = _fwd_call(q5, k4, v4, meta, cfg, save_lse=True)
    return o, (q5, k4, v4, o, lse, meta)


def _flash_bwd(cfg: _Cfg, res, do):
    q5, k4, v4, o, lse, meta = res
    dq, dk, dv = _bwd_call(q5, k4, v4, o, lse, do, meta, cfg)
    return dq, dk, dv, jax.tree.map(lambda _: None, meta)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public entry point


def pallas_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                     causal: bool, scale: float, platform: str = "auto", interpret: bool | None = None,
                     block_q: int = 128, block_kv: int = 128) -> jax.Array:
    """q [B, T, H, d], k/v [B, S, K, d] with H % K == 0 (GQA: query head h uses kv head h // (H//K)).
    q_segment_ids [B, T], kv_segment_ids [B, S] int32: query t may attend key s only if the segment ids are
    equal and the kv segment id is not 0 (0 = padding / empty cache slot).
    q_positions [B, T], kv_positions [B, S] int32: with causal=True additionally require kv_pos <= q_pos.
    Returns [B, T, H, d] in q.dtype. Rows with no allowed key return 0. Softmax in float32.

    platform: the program's target (interpret mode on "cpu", Mosaic otherwise); interpret=True/False overrides
    it. Under a multi-device mesh the kernels run in a shard_map (module docstring)."""
    batch, t, h, d = q.shape
    bk, s, kh, dk = k.shape
    if v.shape != k.shape or bk != batch or dk != d:
        raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} v={v.shape}")
    if h % kh:
        raise ValueError(f"num query heads {h} not a multiple of num kv heads {kh}")
    for name, arr, n in (("q_segment_ids", q_segment_ids, t), ("q_positions", q_positions, t),
                         ("kv_segment_ids", kv_segment_ids, s), ("kv_positions", kv_positions, s)):
        if arr.shape != (batch, n):
            raise ValueError(f"{name} has shape {arr.shape}, expected {(batch, n)}")
    if t == 0 or s == 0:
        return jnp.zeros(q.shape, q.dtype)
    if interpret is None:
        interpret = target.pallas_interpret(platform)
    if not interpret and target.resolve_platform(platform) == "gpu":
        raise NotImplementedError("the pallas attention backend is a TPU (Mosaic) kernel; use the 'cudnn' or "
                                  "'xla' backend for a GPU program, or interpret=True")

    local = functools.partial(_local_attention, causal=bool(causal), scale=float(scale),
                              interpret=bool(interpret), block_q=block_q, block_kv=block_kv)
    ids = tuple(a.astype(jnp.int32) for a in (q_segment_ids, kv_segment_ids, q_positions, kv_positions))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
        return local(q, k, v, *ids)
    batch_axes, head_axes = shard_axes(mesh, batch, kh)
    heads_spec = PartitionSpec(batch_axes, None, head_axes, None)  # q [B, T, H, d] and k/v [B, S, K, d]
    ids_spec = PartitionSpec(batch_axes, None)  # segment ids and positions [B, T] / [B, S]
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(heads_spec,) * 3 + (ids_spec,) * 4,
                            out_specs=heads_spec, check_vma=False)
    return sharded(q, k, v, *ids)


def shard_axes(mesh, batch: int, num_kv_heads: int):
    """(mesh axes of the batch dim, mesh axes of the kv-head dim) for the kernel's shard_map under `mesh` (each
    None, one axis name or a tuple): the active logical rules for "activation_batch" and "activation_kv_heads",
    keeping only axes of the mesh whose sizes divide the dim (`omni_jax.sharding.spec_for`). The query heads take
    the kv heads' axes: H = G * K, and splitting K n ways splits H into n whole GQA groups."""
    rules = tuple(nn.get_logical_axis_rules()) or LOGICAL_AXIS_RULES
    spec = spec_for((batch, num_kv_heads), ("activation_batch", "activation_kv_heads"), mesh, rules)
    return spec[0], spec[1]


def _local_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal: bool,
                     scale: float, interpret: bool, block_q: int, block_kv: int) -> jax.Array:
    """`pallas_attention` on one device's arrays (validated, int32 ids): pad, lay out, run the kernels."""
    batch, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    groups = h // kh

    # Block sizes: a sequence shorter than the block becomes a single (full-extent) block. Compiled for
    # TPU, multi-block sequences need lane-aligned (128) blocks (lane-major [8, block] metadata and
    # logsumexp tiles); the kv extent is padded to 128 lanes.
    sub = 16 if jnp.dtype(q.dtype).itemsize < 4 else 8
    bq = min(block_q, _round_up(t, sub))
    bkv = min(block_kv, _round_up(s, sub if interpret else NUM_LANES))
    if not interpret:
        if _round_up(t, bq) > bq and bq % NUM_LANES:
            raise ValueError(f"block_q={block_q} must be a multiple of {NUM_LANES} on TPU")
        if _round_up(s, bkv) > bkv and bkv % NUM_LANES:
            raise ValueError(f"block_kv={block_kv} must be a multiple of {NUM_LANES} on TPU")
    tp, sp = _round_up(t, bq), _round_up(s, bkv)

    qseg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))
    qpos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, tp - t)))
    kseg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))   # padded keys: segment 0
    kpos = jnp.pad(kv_positions.astype(jnp.int32), ((0, 0), (0, sp - s)))
    nq, nk = tp // bq, sp // bkv
    qst = _stats(qseg, qpos, bq, is_q=True)
    kst = _stats(kseg, kpos, bkv, is_q=False)
    qrng, krng = _active_ranges(qst, kst, batch, nq, nk, causal)
    meta = dict(qseg=qseg, qpos=qpos, kseg=kseg, kpos=kpos, qst=qst, kst=kst, qrng=qrng, krng=krng)

    # [B, T, H, d] -> [B, K, G, Tp, d];  [B, S, K, d] -> [B, K, Sp, d]
    q5 = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q5 = q5.reshape(batch, tp, kh, groups, d).transpose(0, 2, 3, 1, 4)
    k4 = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v4 = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    cfg = _Cfg(causal=bool(causal), scale=float(scale), groups=groups, block_q=bq, block_kv=bkv,
               interpret=bool(interpret))
    o5 = _flash(q5, k4, v4, meta, cfg)
    o = o5.transpose(0, 3, 1, 2, 4).reshape(batch, tp, h, d)
    return o[:, :t]
