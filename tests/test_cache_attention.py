"""omni_jax.kernels.cache_attention: a decode step's attention over one layer of the stacked KV cache, read in
place, equals slicing the layer and running the dense path (`_xla_attention`), for float32 and bfloat16 caches
(bfloat16 with and without the dot-product instruction), GQA group sizes of the released configs, short and long
caches (slot ranges, chunks and blocks with tails), left padding, empty slots, a padding query row and a traced
layer index; slots past the last one any row attends to are not read."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_paths
from omni_jax.kernels import build, cache_attention
from omni_jax.models import attention as attn
from omni_jax.models.attention import AttentionMask
from omni_jax.models.kv_cache import KVCache, to_storage

pytestmark = pytest.mark.skipif(not build.cpu_has_features(), reason=kernel_paths.SKIP_WITHOUT_KERNELS)


def _inputs(dtype, batch, heads, kv_heads, head_dim, slots=45, layers=3, written=38):
    rng = np.random.default_rng(heads * 100 + head_dim)
    cache = KVCache.init(layers, batch, slots, kv_heads, head_dim, dtype)
    k = jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32)
    v = jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32)
    cache = cache.replace(k=to_storage(k, dtype), v=to_storage(v, dtype))
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, head_dim)), dtype)
    kv_seg = np.zeros((batch, slots), np.int32)
    kv_seg[:, :written] = 1
    kv_seg[1 % batch, :13] = 0  # left padding
    q_seg = np.ones((batch, 1), np.int32)
    q_seg[-1] = 0 if batch > 2 else 1  # a padding query row: no allowed key, output 0
    mask = AttentionMask(jnp.asarray(q_seg), jnp.asarray(kv_seg), jnp.full((batch, 1), written - 1, jnp.int32),
                         jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots)), causal=True)
    return q, cache, mask


def _check_against_dense(dtype, batch, heads, kv_heads, head_dim, slots, written):
    q, cache, mask = _inputs(dtype, batch, heads, kv_heads, head_dim, slots=slots, written=written)
    assert cache_attention.use_kernel(heads, cache.k, cache.dtype)
    scale = head_dim**-0.5
    run = jax.jit(lambda q, k, v, layer: attn.cached_attention(q, k, v, layer, dtype, mask, scale=scale))
    primitives = str(jax.make_jaxpr(lambda q, k, v: attn.cached_attention(q, k, v, 1, dtype, mask, scale=scale))(
        q, cache.k, cache.v))
    assert "ffi_call" in primitives and "dot_general" not in primitives  # the kernel ran, not a sliced dot
    for layer in range(cache.k.shape[0]):  # a traced layer index, as in a scanned decoder
        got = run(q, cache.k, cache.v, jnp.int32(layer))
        want = attn._xla_attention(q, cache.layer_k(layer), cache.layer_v(layer), mask, scale)
        assert got.dtype == dtype and got.shape == want.shape
        # float32: the same products and softmax, sums in another order (2e-6). bfloat16: the same float32 sums
        # and bf16-rounded probabilities; the output's bf16 rounding can differ by one ulp (2^-8) after that.
        tol = 2e-6 if dtype == jnp.float32 else 8e-3
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
        if batch > 2:
            assert np.all(np.asarray(got, np.float32)[-1] == 0)


# (batch, heads, kv_heads, head_dim, slots, written)
SHAPES = [
    (3, 12, 4, 128, 45, 38), (2, 14, 2, 64, 45, 38), (1, 28, 4, 128, 45, 38), (3, 4, 4, 64, 45, 38),
    (1, 12, 4, 128, 300, 261), (4, 28, 4, 128, 200, 157),  # long: several ranges / chunks / blocks, with tails
    (2, 4, 2, 64, 45, 38), (2, 16, 4, 64, 45, 38), (3, 10, 2, 64, 70, 66), (2, 12, 2, 64, 45, 38),
    (2, 16, 2, 128, 45, 38)]  # 2, 4, 5, 6 and 8 query heads per kv head: every tile shape of both builds


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,slots,written", SHAPES)
def test_kernel_equals_sliced_dense_attention(dtype, batch, heads, kv_heads, head_dim, slots, written):
    _check_against_dense(dtype, batch, heads, kv_heads, head_dim, slots, written)


_FRESH_PROCESS_CHECK = """
import sys
sys.path.insert(0, {tests!r})
import jax.numpy as jnp
from omni_jax.kernels import build
import test_cache_attention as t
print("isa", build.cpu_isa())
for dtype in {dtypes}:
    for shape in t.SHAPES:
        t._check_against_dense(dtype, *shape)
print("checked")
"""


@kernel_paths.FORCED_PATHS
def test_forced_paths_in_a_fresh_process(variable, value, dtypes, isa):
    """The widened bfloat16 scores and the AVX2 build (kernel_paths), checked against dense attention."""
    assert "checked" in kernel_paths.run_forced(_FRESH_PROCESS_CHECK, variable, value, dtypes, isa)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_slots_past_the_attended_ones_are_not_read(dtype):
    """NaN keys and values in the slots after the last one any row attends to (as a reused cache could hold) leave
    the output finite and equal to that of a cache with zeros there: the kernel stops at that slot. The kernel's
    own limit: scores past it are 0, and a limit of 0 gives zeros."""
    q, cache, mask = _inputs(dtype, 3, 12, 4, 128, slots=130, written=71)
    run = jax.jit(lambda k, v: attn.cached_attention(q, k, v, 1, dtype, mask, scale=0.1))
    want = run(cache.k, cache.v)
    nan = to_storage(jnp.full(cache.k.shape, jnp.nan), dtype)
    beyond = (jnp.arange(130) >= 71)[None, None, :, None, None]
    got = run(jnp.where(beyond, nan, cache.k), jnp.where(beyond, nan, cache.v))
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

    scores = cache_attention.scores(q[:, 0], cache.k, 1, 50)
    assert np.all(np.asarray(scores)[:, :, 50:] == 0) and np.all(np.asarray(scores)[:, :, :50] != 0)
    assert np.all(np.asarray(cache_attention.scores(q[:, 0], cache.k, 1, 0)) == 0)
    assert np.all(np.asarray(cache_attention.mix(jnp.ones((3, 12, 130)), cache.v, 1, 0)) == 0)


def test_where_it_does_not_apply():
    cache = KVCache.init(2, 1, 8, 2, 64, jnp.bfloat16)
    assert cache_attention.use_kernel(4, cache.k, cache.dtype)
    assert not cache_attention.use_kernel(4, KVCache.init(2, 1, 8, 2, 16, jnp.float32).k, jnp.float32)  # head_dim
    assert not cache_attention.use_kernel(18, cache.k, cache.dtype)  # 9 query heads per kv head
    assert not cache_attention.use_kernel(4, KVCache.init(2, 1, 8, 2, 64, jnp.float16).k, jnp.float16)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):  # the SPMD partitioner cannot split a custom call: sharded runs stay on XLA
        assert not cache_attention.use_kernel(4, cache.k, cache.dtype)
