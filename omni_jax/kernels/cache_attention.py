"""CPU kernels for a decode step's attention products over one layer of the stacked KV cache, read in place.

`scores(q, cache_k, layer, limit)` -> q . k over the slots below `limit` and `mix(p, cache_v, layer, limit)` ->
p-weighted sum of their values (`cache_attention.cc`); the masked softmax between them stays in XLA
(`omni_jax.models.attention`), which passes as `limit` one past the last slot any row attends to. XLA:CPU's
dot wants the (batch, kv-head) dims leading, so it copied each layer's [B, S, K, d] cache slice into that layout
at every step (talker bf16 decode, batch 8, 1058 slots: ~80 ms of ~280 ms a step); the kernels read the
[L, B, S, K, d] cache where it lies. Float32 products and sums (bfloat16 widened exactly).

Used where `use_kernel` holds: a CPU program (`omni_jax.kernels.target.cpu_paths`), no multi-device mesh, a
float32 or bfloat16 cache (bfloat16 as its uint16 bits, as `KVCache` stores it on the CPU), head_dim a multiple
of 64, at most 8 query heads per kv head.
`OMNI_JAX_CPU_CACHE_ATTENTION=0` turns it off. Not differentiable (decode only).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from omni_jax.kernels import build, target
from omni_jax.models.kv_cache import to_storage

_SOURCE = Path(__file__).with_name("cache_attention.cc")
_SCORES, _MIX = "omni_jax_cache_scores", "omni_jax_cache_mix"
ENV_SWITCH = "OMNI_JAX_CPU_CACHE_ATTENTION"
MAX_GROUPS = 8
HEAD_DIM_MULTIPLE = 64


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels are built and registered (compiles them on the first call)."""
    return build.load(_SOURCE, {_SCORES: "OmniJaxCacheScores", _MIX: "OmniJaxCacheMix"}, ENV_SWITCH)


def use_kernel(num_heads: int, cache: jax.Array, cache_dtype, platform: str = "auto") -> bool:
    """Whether a decode step's attention over `cache` ([L, B, S, K, d], KVCache storage) in a program for
    `platform` should run here."""
    _, _, _, num_kv_heads, head_dim = cache.shape
    stored_ok = (jnp.dtype(cache_dtype), cache.dtype) in (
        (jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)), (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint16)))
    return (target.cpu_paths(platform) and stored_ok and head_dim % HEAD_DIM_MULTIPLE == 0
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUPS
            and not build.multi_device_mesh() and available())


def scores(q: jax.Array, cache_k: jax.Array, layer, limit) -> jax.Array:
    """q [B, H, d] . cache_k[layer] ([B, S, K, d]; head h reads kv head h // (H/K)) -> [B, H, S] float32, for the
    slots s < limit (a scalar); the others are 0. q is taken in the cache's dtype (bfloat16 for a uint16 cache)."""
    batch, heads, _ = q.shape
    slots = cache_k.shape[2]
    q = to_storage(q, jnp.bfloat16 if cache_k.dtype == jnp.uint16 else cache_k.dtype, stored=cache_k.dtype)
    return jax.ffi.ffi_call(_SCORES, jax.ShapeDtypeStruct((batch, heads, slots), jnp.float32))(
        q, cache_k, jnp.asarray(layer, jnp.int32), jnp.asarray(limit, jnp.int32))


def mix(p: jax.Array, cache_v: jax.Array, layer, limit) -> jax.Array:
    """sum over the slots s < limit (a scalar) of p [B, H, S] * cache_v[layer] ([B, S, K, d]) -> [B, H, d]
    float32; p must be 0 on the others for this to be the sum over all slots."""
    batch, heads, _ = p.shape
    head_dim = cache_v.shape[-1]
    return jax.ffi.ffi_call(_MIX, jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.float32))(
        p.astype(jnp.float32), cache_v, jnp.asarray(layer, jnp.int32), jnp.asarray(limit, jnp.int32))
