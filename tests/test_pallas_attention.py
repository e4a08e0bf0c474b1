"""Pallas attention backend vs a plain-jnp reference (interpret mode on CPU).

Every case runs forward + backward (one jit, one vjp) and compares output, dq, dk, dv with the
reference. Small shapes and 8/16/32 blocks keep the interpret-mode compiles cheap.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.kernels import pallas_attention as pa
from omni_jax.kernels.pallas_attention import pallas_attention


# ----------------------------------------------------------------------------- reference


def reference_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, causal, scale):
    """Plain-jnp attention with the mask rules of pallas_attention; f32 softmax; empty rows -> 0."""
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    kk = jnp.repeat(k.astype(jnp.float32), groups, axis=2)   # query head h uses kv head h // groups
    vv = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kk) * scale
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    if causal:
        mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    mask = mask[:, None]                                     # [B, 1, T, S]
    s = jnp.where(mask, s, -1e30)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
    return jnp.einsum("bhts,bshd->bthd", p, vv).astype(q.dtype)


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    name: str
    q_seg: np.ndarray          # [B, T]
    kv_seg: np.ndarray         # [B, S]
    q_pos: np.ndarray
    kv_pos: np.ndarray
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    block_q: int = 16
    block_kv: int = 16
    dtype: type = jnp.float32
    nan_kv: tuple = ()         # (batch, start, stop): k/v slots poisoned with NaN (must be skipped)


def _self_attn_left_pad(t, pads):
    """Causal LM prefill with left padding: segment 1 on real tokens, positions from 0 at the first."""
    seg = np.stack([np.r_[np.zeros(p), np.ones(t - p)] for p in pads]).astype(np.int32)
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return seg, pos


def _decode(s, t, fills, pads):
    """KV cache of s slots; batch row r holds tokens in slots [pads[r], fills[r]) (the last t of them are
    the current queries); slots outside are empty (segment 0)."""
    kv_seg, kv_pos, q_seg, q_pos = [], [], [], []
    for fill, pad in zip(fills, pads):
        slots = np.arange(s)
        valid = (slots >= pad) & (slots < fill)
        kv_seg.append(valid.astype(np.int32))
        kv_pos.append(np.where(valid, slots - pad, 0))
        q_seg.append(np.ones(t, np.int32))
        q_pos.append(np.arange(fill - t, fill) - pad)
    return tuple(np.stack(a).astype(np.int32) for a in (q_seg, kv_seg, q_pos, kv_pos))


def _packed(lengths_per_row, total):
    """Packed sequences: segment ids 1, 2, ... per row, trailing padding 0, positions restart at 0."""
    segs, poss = [], []
    for lengths in lengths_per_row:
        seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] +
                             [np.zeros(total - sum(lengths))])
        pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(total - sum(lengths))])
        segs.append(seg)
        poss.append(pos)
    return np.stack(segs).astype(np.int32), np.stack(poss).astype(np.int32)


def _cases():
    cases = []
    # 1. causal prefill, left padding in a batch of 2, GQA 1, odd length; row 1's first kv block is all
    #    padding and poisoned with NaN: it must be skipped (neither loaded into the math nor in grads).
    seg, pos = _self_attn_left_pad(37, pads=(0, 20))
    cases.append(Case("prefill_leftpad_gqa1", seg, seg, pos, pos, 2, 2, 16, True, nan_kv=(1, 0, 16)))
    # 2. decode against a cache, T < S, queries at the end, GQA 2, head_dim 64, odd S, bq=8 (T=4).
    qs, ks, qp, kp = _decode(53, 4, fills=(53, 45), pads=(0, 7))
    cases.append(Case("decode_cache_gqa2_d64", qs, ks, qp, kp, 4, 2, 64, True, block_kv=32))
    # 3. packed segments, causal, GQA 4.
    seg, pos = _packed([[20, 30, 10], [33, 31]], 64)
    cases.append(Case("packed_gqa4", seg, seg, pos, pos, 8, 2, 16, True))
    # 4. bidirectional windowed encoder: segment = window id, non-causal, head_dim 64, padded tail.
    seg = (np.arange(53)[None] // 8 + 1).repeat(2, 0).astype(np.int32)
    seg[1, 48:] = 0
    pos = np.broadcast_to(np.arange(53), (2, 53)).astype(np.int32)
    cases.append(Case("window_encoder_noncausal_d64", seg, seg, pos, pos, 2, 2, 64, False,
                      block_q=16, block_kv=32))
    # 5. T=37 vs S=53 non-causal, GQA 2; row 1 has query rows with no allowed key (segment 2 absent from
    #    kv, and segment-0 padding queries): they must come out 0.
    q_seg = np.ones((2, 37), np.int32)
    q_seg[1, 27:32] = 2
    q_seg[1, 32:] = 0
    kv_seg = np.ones((2, 53), np.int32)
    kv_seg[1, 43:] = 0
    q_pos = np.broadcast_to(np.arange(37), (2, 37)).astype(np.int32)
    kv_pos = np.broadcast_to(np.arange(53), (2, 53)).astype(np.int32)
    cases.append(Case("odd_T37_S53_noncausal_gqa2_empty_rows", q_seg, kv_seg, q_pos, kv_pos, 4, 2, 16,
                      False))
    # 6. single-token decode, GQA 4, different cache fill per row.
    qs, ks, qp, kp = _decode(53, 1, fills=(53, 30), pads=(0, 0))
    cases.append(Case("decode_T1_gqa4", qs, ks, qp, kp, 8, 2, 16, True))
    # 7. bf16: causal packed + left-padded prefill, GQA 2, head_dim 64.
    seg, pos = _packed([[40, 24], [64]], 64)
    seg[1, :9] = 0
    pos[1] = np.maximum(np.cumsum(seg[1]) - 1, 0)
    cases.append(Case("bf16_packed_gqa2_d64", seg, seg, pos, pos, 4, 2, 64, True, block_q=32,
                      block_kv=32, dtype=jnp.bfloat16))
    return cases


CASES = _cases()


def _inputs(case: Case, seed=0):
    b, t = case.q_seg.shape
    s = case.kv_seg.shape[1]
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, case.heads, case.head_dim), jnp.float32).astype(case.dtype)
    k = jax.random.normal(kk, (b, s, case.kv_heads, case.head_dim), jnp.float32).astype(case.dtype)
    v = jax.random.normal(kv, (b, s, case.kv_heads, case.head_dim), jnp.float32).astype(case.dtype)
    do = jax.random.normal(kd, (b, t, case.heads, case.head_dim), jnp.float32).astype(case.dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def _tolerances(case: Case):
    """(forward, backward) tolerances against the f32 reference evaluated on the same inputs."""
    if case.dtype == jnp.float32:
        return dict(atol=1e-5, rtol=0.0), dict(atol=1e-5, rtol=0.0)
    # bf16 inputs; the reference runs in f32 on the (exactly upcast) bf16 inputs, so the difference is
    # the kernel's own rounding: the probabilities are rounded to bf16 before the PV matmul (standard
    # flash practice; relative 2^-9 per term, <= 2^-9 * max|v| ~ 8e-3 for |v| <= 4) and the output is
    # rounded to bf16 (half an ulp, 2^-9 relative, ~7e-3 at |o| ~ 3.5): atol 2e-2. In the backward, P
    # and dS are rounded to bf16 before the matmuls and dq/dk/dv are sums of O(S) such terms plus a
    # final bf16 rounding: checked at 1e-2 of the largest gradient entry (observed ~2e-3).
    return dict(atol=2e-2, rtol=0.0), dict(atol=1e-2, rtol=0.0, relative_to_max=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_reference(case: Case):
    q, k, v, do = _inputs(case)
    ids = tuple(jnp.asarray(a) for a in (case.q_seg, case.kv_seg, case.q_pos, case.kv_pos))
    scale = case.head_dim ** -0.5

    def kernel_fn(q, k, v):
        return pallas_attention(q, k, v, q_segment_ids=ids[0], kv_segment_ids=ids[1],
                                q_positions=ids[2], kv_positions=ids[3], causal=case.causal,
                                scale=scale, block_q=case.block_q, block_kv=case.block_kv)

    def ref_fn(q, k, v):
        return reference_attention(q, k, v, *ids, causal=case.causal, scale=scale)

    kq, kk, kv_ = q, k, v
    if case.nan_kv:
        bi, lo, hi = case.nan_kv
        assert (case.kv_seg[bi, lo:hi] == 0).all()
        kk = k.at[bi, lo:hi].set(jnp.nan)
        kv_ = v.at[bi, lo:hi].set(jnp.nan)

    got = jax.jit(lambda *a: _fwd_bwd(kernel_fn, *a))(kq, kk, kv_, do)
    want = jax.jit(lambda *a: _fwd_bwd(ref_fn, *a))(
        *(x.astype(jnp.float32) for x in (q, k, v, do)))

    fwd_tol, bwd_tol = _tolerances(case)
    for name, g, w, x in zip(("out", "dq", "dk", "dv"), got, want, (q, q, k, v)):
        assert g.shape == w.shape and g.dtype == x.dtype, name
        g32, w32 = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g32).all(), f"{case.name}: {name} not finite"
        tol = dict(fwd_tol if name == "out" else bwd_tol)
        if tol.pop("relative_to_max", False):
            tol["atol"] *= float(np.abs(w32).max())
        np.testing.assert_allclose(g32, w32, err_msg=f"{case.name}: {name}", **tol)

    # Query rows with no allowed key are exactly 0.
    allowed = (case.q_seg[:, :, None] == case.kv_seg[:, None, :]) & (case.kv_seg[:, None, :] != 0)
    if case.causal:
        allowed &= case.kv_pos[:, None, :] <= case.q_pos[:, :, None]
    empty = ~allowed.any(-1)
    if empty.any():
        assert (np.asarray(got[0], np.float32)[empty] == 0).all()
        assert (np.asarray(got[1], np.float32)[empty] == 0).all()


def test_block_skip_tables():
    """Active kv-block ranges: causal blocks after the diagonal, all-padding blocks and blocks of other
    segments are outside the [first, last] range that the kernels visit."""
    seg, pos = _self_attn_left_pad(64, pads=(0, 20))
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    qst, kst = pa._stats(seg, pos, 16, is_q=True), pa._stats(seg, pos, 16, is_q=False)
    qrng, krng = pa._active_ranges(qst, kst, 2, 4, 4, causal=True)
    qrng = np.asarray(qrng).reshape(2, 4, 2)
    krng = np.asarray(krng).reshape(2, 4, 2)
    np.testing.assert_array_equal(qrng[0], [[0, 0], [0, 1], [0, 2], [0, 3]])
    # row 1: q block 0 is all padding (no work), kv block 0 is all padding (never visited).
    np.testing.assert_array_equal(qrng[1], [[0, 0], [1, 1], [1, 2], [1, 3]])
    np.testing.assert_array_equal(krng[0], [[0, 3], [1, 3], [2, 3], [3, 3]])
    np.testing.assert_array_equal(krng[1], [[0, 0], [1, 3], [2, 3], [3, 3]])
    q_lo = np.asarray(qst).reshape(2, 4, pa.N_STATS)[1, 0, pa._SEG_LO_NZ]
    assert q_lo == np.iinfo(np.int32).max  # the all-padding q block can never be active

    # Packed segments, non-causal: block-diagonal in segment space.
    seg, pos = _packed([[32, 32]], 64)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    qst, kst = pa._stats(seg, pos, 16, is_q=True), pa._stats(seg, pos, 16, is_q=False)
    qrng, _ = pa._active_ranges(qst, kst, 1, 4, 4, causal=False)
    np.testing.assert_array_equal(np.asarray(qrng).reshape(4, 2), [[0, 1], [0, 1], [2, 3], [2, 3]])


def test_lowers_for_tpu():
    """Forward + both backward kernels lower to Mosaic for TPU at production block sizes (128), bf16,
    GQA 7 (Qwen2.5-7B), ragged lengths. Only the Pallas->Mosaic lowering runs here (no TPU compile)."""
    b, t, s, h, kh, d = 2, 200, 300, 28, 4, 128
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

    def f(q, k, v, qs, ks, qp, kp):
        fn = lambda q, k, v: pallas_attention(  # noqa: E731
            q, k, v, q_segment_ids=qs, kv_segment_ids=ks, q_positions=qp, kv_positions=kp,
            causal=True, scale=d ** -0.5, interpret=False)
        return _fwd_bwd(fn, q, k, v, q)

    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(
        sd(b, t, h, d), sd(b, s, kh, d), sd(b, s, kh, d), i32(b, t), i32(b, s), i32(b, t), i32(b, s))
    assert exported.mlir_module().count("tpu_custom_call") == 3


# ----------------------------------------------------------------------------- sharded (shard_map)


def _sharded_case():
    """Batch 4 with left padding (row 1), packed segments (row 2: 3 segments) and trailing padding (row 3);
    causal; GQA 2 (4 query heads, 2 kv heads); T = S = 64 in 16-blocks, so block skipping runs on each shard."""
    batch, length = 4, 64
    seg = np.ones((batch, length), np.int32)
    seg[1, :21] = 0
    seg[2, 30:50], seg[2, 50:] = 2, 3
    seg[3, 40:] = 0
    pos = np.zeros_like(seg)
    for b in range(batch):
        for s in np.unique(seg[b]):
            where = np.nonzero(seg[b] == s)[0]
            pos[b, where] = np.arange(len(where))  # positions restart in each segment
    q, k, v, do = _inputs(Case("sharded", seg, seg, pos, pos, heads=4, kv_heads=2, head_dim=16, causal=True))
    return q, k, v, do, jnp.asarray(seg), jnp.asarray(pos)


def _kernel_fwd_bwd(q, k, v, do, seg, pos):
    """pallas_attention (interpret mode; 16-blocks) forward and vjp: (out, dq, dk, dv)."""
    def fn(q, k, v):
        return pallas_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                                causal=True, scale=16 ** -0.5, platform="cpu", block_q=16, block_kv=16)
    return _fwd_bwd(fn, q, k, v, do)


# mesh shape -> (batch axes, kv-head axes) the kernel's shard_map splits over, for batch 4 and 2 kv heads
SHARDED_MESHES = {
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, (("data", "fsdp"), "tensor")),
    "fsdp2_tensor4": ({"fsdp": 2, "tensor": 4}, ("fsdp", None)),  # 4 does not divide 2 kv heads: not split
    "data8": ({"data": 8}, (None, None)),  # 8 does not divide the batch of 4: not split
}


@pytest.fixture(scope="module")
def sharded_reference():
    """Inputs and the unsharded xla backend's (out, dq, dk, dv) for `_sharded_case` (no mesh, dense f32)."""
    from omni_jax.models.attention import AttentionMask, attention

    q, k, v, do, seg, pos = _sharded_case()
    mask = AttentionMask(seg, seg, pos, pos, causal=True)
    want = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: attention(q, k, v, mask, backend="xla"), *a))(q, k, v, do)
    return (q, k, v, do, seg, pos), want


@pytest.mark.parametrize("mesh_name", list(SHARDED_MESHES))
def test_sharded_equals_unsharded(mesh_name, sharded_reference):
    """Under a mesh of 8 (virtual CPU) devices the kernel runs inside a shard_map (the interpret-mode kernels, as
    a TPU program runs its Mosaic kernels), split over batch and kv heads only where the mesh axes divide them.
    Output and gradients w.r.t. q, k, v equal the unsharded xla backend's.

    Tolerance, float32: the kernel's online softmax rescales and sums over 16-key blocks in another order than
    the dense softmax, so each entry of out/dq/dk/dv (a sum of at most 64 products) differs by a few float32 ulps
    of the largest entry (eps 1.2e-7). Measured over the three meshes: at most 4.1e-7 x max|reference| (dv;
    out 1.7e-7, dq 3.1e-7, dk 3.4e-7). Bound: 2e-6 x max|reference|, about 5x that."""
    from omni_jax.kernels.pallas_attention import shard_axes
    from omni_jax.sharding import make_mesh

    (q, k, v, do, seg, pos), want = sharded_reference
    shape, expected_axes = SHARDED_MESHES[mesh_name]
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        assert shard_axes(jax.sharding.get_abstract_mesh(), q.shape[0], k.shape[2]) == expected_axes
        batch_axes, head_axes = expected_axes
        heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes, None, head_axes, None))
        ids = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes, None))
        run = jax.jit(_kernel_fwd_bwd, in_shardings=(heads,) * 4 + (ids,) * 2)
        assert "shard_map" in str(jax.make_jaxpr(_kernel_fwd_bwd)(q, k, v, do, seg, pos))
        got = run(q, k, v, do, seg, pos)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        w32 = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w32, rtol=0, atol=2e-6 * np.abs(w32).max(),
                                   err_msg=f"{mesh_name}: {name}")


def test_no_mesh_calls_the_kernel_directly():
    """Without a mesh (and under a 1-device mesh) there is no shard_map around the kernels."""
    from omni_jax.sharding import make_mesh

    q, k, v, do, seg, pos = _sharded_case()
    assert "shard_map" not in str(jax.make_jaxpr(_kernel_fwd_bwd)(q, k, v, do, seg, pos))
    with jax.set_mesh(make_mesh({"fsdp": 1}, devices=jax.devices()[:1])):
        assert "shard_map" not in str(jax.make_jaxpr(_kernel_fwd_bwd)(q, k, v, do, seg, pos))
