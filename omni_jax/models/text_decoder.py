"""Qwen2 decoder stack (thinker LM and talker): GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE.

One module serves training (full sequences, packed segments, remat; layers scanned over stacked weights) and
serving (prefill and cached decode through the explicit `KVCache`; layers usually unrolled over per-layer
weights, `scan_layers=False`, see RuntimeOptions).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from omni_jax.config import REMAT_POLICIES
from omni_jax.models.attention import AttentionMask, attention, cached_attention
from omni_jax.kernels.paged_attention import paged_attention
from omni_jax.models.kv_cache import KVCache, PagedKVCache, to_storage
from omni_jax.models.layers import Einsum, RMSNorm, constrain
from omni_jax.models.rotary import apply_rotary, mrope_cos_sin


ACT_BATCH, ACT_LENGTH, ACT_EMBED = "activation_batch", "activation_length", "activation_embed"


class SelfAttention(nn.Module):
    """GQA self-attention with q/k/v bias, no o bias, M-RoPE on q and k, optional KV-cache write."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    cache_dtype: Any = None  # logical dtype of cache_k / cache_v (KVCache.dtype)
    platform: str = "auto"  # the program's target (omni_jax.kernels.target)

    @nn.compact
    def __call__(self, x, cos, sin, mask: AttentionMask, layer_index, write_index, cache_k, cache_v):
        """x [B, T, D] -> ([B, T, D], cache_k, cache_v); caches are [L, B, S, K, d] or None."""
        D, H, K, d = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        q = Einsum("btd,dnh->btnh", (D, H, d), ("embed", "heads", "head_dim"), (H, d), ("heads", "head_dim"),
                   name="q_proj", **kw)(x)
        k = Einsum("btd,dnh->btnh", (D, K, d), ("embed", "kv_heads", "head_dim"), (K, d), ("kv_heads", "head_dim"),
                   name="k_proj", **kw)(x)
        v = Einsum("btd,dnh->btnh", (D, K, d), ("embed", "kv_heads", "head_dim"), (K, d), ("kv_heads", "head_dim"),
                   name="v_proj", **kw)(x)
        q = constrain(apply_rotary(q, cos, sin), (ACT_BATCH, ACT_LENGTH, "activation_heads", None))  # [B, T, H, d]
        k = constrain(apply_rotary(k, cos, sin), (ACT_BATCH, ACT_LENGTH, "activation_kv_heads", None))  # [B, T, K, d]
        v = constrain(v, (ACT_BATCH, ACT_LENGTH, "activation_kv_heads", None))

        if isinstance(mask, PagedRows):  # cache_k: the tuple of every layer's page pool
            pool = cache_k[layer_index]
            new_k, new_v = (to_storage(a, self.cache_dtype, pool.dtype) for a in (k, v))
            out, pool = paged_attention(q, new_k, new_v, pool, mask.page_table, mask.kv_lens, mask.q_lens,
                                        scale=d**-0.5, cache_dtype=self.cache_dtype, platform=self.platform)
            cache_k = cache_k[:layer_index] + (pool,) + cache_k[layer_index + 1:]
        elif cache_k is not None:  # caches hold storage_dtype(cache_dtype, platform) (on the CPU: 16-bit floats' bits)
            start = (layer_index, 0, write_index, 0, 0)
            new_k, new_v = (to_storage(a[None], self.cache_dtype, cache_k.dtype) for a in (k, v))  # [1, B, T, K, d]
            cache_k = jax.lax.dynamic_update_slice(cache_k, new_k, start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, new_v, start)
            out = cached_attention(q, cache_k, cache_v, layer_index, self.cache_dtype, mask, scale=d**-0.5,
                                   backend=self.attention_backend, platform=self.platform)  # [B, T, H, d]
        else:
            out = attention(q, k, v, mask, scale=d**-0.5, backend=self.attention_backend,
                            platform=self.platform)  # [B, T, H, d]
        out = Einsum("btnh,nhd->btd", (H, d, D), ("heads", "head_dim", "embed"), name="o_proj", **kw)(out)
        return out, cache_k, cache_v


@flax.struct.dataclass
class PagedRows:
    """What the layers of a paged call need in place of an AttentionMask: each row's pages, its length after
    the call and how many of its T tokens are real (the leading ones)."""

    page_table: jax.Array  # [B, M] int32
    kv_lens: jax.Array  # [B] int32
    q_lens: jax.Array  # [B] int32


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    hidden_size: int
    intermediate_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str = "auto"

    @nn.compact
    def __call__(self, x):
        D, F = self.hidden_size, self.intermediate_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        gate = Einsum("btd,df->btf", (D, F), ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Einsum("btd,df->btf", (D, F), ("embed", "mlp"), name="up_proj", **kw)(x)
        act = constrain(swiglu(gate, up), (ACT_BATCH, ACT_LENGTH, "activation_mlp"))  # [B, T, F]
        return Einsum("btf,fd->btd", (F, D), ("mlp", "embed"), name="down_proj", **kw)(act)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up in the inputs' dtype, each of the two results rounded once, as PyTorch computes it.

    In bfloat16, `nn.silu(gate) * up` would round after every elementwise op XLA splits it into (negate, exp,
    add, divide, multiply, multiply); here the arithmetic is float32 and only the silu and the product are rounded
    to bfloat16 (torch's CPU kernels do the same). Fewer conversions, too: the fusion at talker decode, [8, 18944],
    took ~170 us."""
    dtype = gate.dtype
    act = nn.silu(gate.astype(jnp.float32)).astype(dtype)
    return (act.astype(jnp.float32) * up.astype(jnp.float32)).astype(dtype)


class DecoderLayer(nn.Module):
    """x -> h = x + o(Attn(RMSNorm(x))) -> h + MLP(RMSNorm(h))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    cache_dtype: Any = None
    platform: str = "auto"

    @nn.compact
    def __call__(self, carry, layer_index, cos, sin, mask: AttentionMask, write_index):
        """carry = (x [B, T, D], cache_k, cache_v) with caches [L, B, S, K, d] or None; returns (carry, None)."""
        x, cache_k, cache_v = carry
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.hidden_size, self.rms_norm_eps, name="input_layernorm", **kw)(x)
        attn_out, cache_k, cache_v = SelfAttention(
            self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
            attention_backend=self.attention_backend, cache_dtype=self.cache_dtype, platform=self.platform,
            name="self_attn", **kw,
        )(h, cos, sin, mask, layer_index, write_index, cache_k, cache_v)
        x = constrain(x + attn_out, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        h = RMSNorm(self.hidden_size, self.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = constrain(x + MLP(self.hidden_size, self.intermediate_size, platform=self.platform, name="mlp", **kw)(h),
                      (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        return (x, cache_k, cache_v), None


class TextDecoder(nn.Module):
    """`num_layers` DecoderLayers, followed by the final RMSNorm.

    scan_layers=True: one nn.scan over weights stacked on a leading "layers" axis (params `layers/...`);
    False: a Python loop over separate per-layer modules (params `layers_0/...`, `layers_1/...`)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = True
    platform: str = "auto"  # the program's target (omni_jax.kernels.target)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D] input embeddings
        positions: jax.Array,  # [3, B, T] RoPE positions (t, h, w)
        segment_ids: jax.Array,  # [B, T] int32: 0 = padding; packed sequences use 1, 2, ...
        cache: Optional[KVCache] = None,
    ) -> tuple[jax.Array, Optional[KVCache]]:
        """Returns the post-norm hidden states [B, T, D] and the updated cache (None without a cache)."""
        batch, length, _ = x.shape
        cos, sin = mrope_cos_sin(positions, self.head_dim, self.rope_theta, self.mrope_section, self.dtype)
        x = constrain(x.astype(self.dtype), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

        if isinstance(cache, PagedKVCache):
            if self.scan_layers:
                raise ValueError("a paged KV cache needs unrolled layers (RuntimeOptions.scan_layers=False): each "
                                 "layer's page pool is its own array")
            q_lens = jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)  # real tokens lead each row
            mask = PagedRows(cache.page_table.astype(jnp.int32), cache.lengths.astype(jnp.int32) + q_lens, q_lens)
            write_index = jnp.zeros((), jnp.int32)
            cache_k, cache_v = tuple(cache.pages), None
        elif cache is None:
            slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            mask = AttentionMask(segment_ids, segment_ids, slots, slots, causal=True)
            write_index = jnp.zeros((), jnp.int32)
            cache_k = cache_v = None
        else:
            write_index = cache.length
            q_slots = write_index + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                          (0, write_index))
            kv_slots = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), (batch, cache.max_length))
            mask = AttentionMask(segment_ids.astype(jnp.int32), kv_segment_ids, q_slots, kv_slots, causal=True)
            cache_k, cache_v = cache.k, cache.v

        layer_cls = DecoderLayer
        policy_name = REMAT_POLICIES[self.remat_policy]  # e.g. "dots" -> "dots_saveable"; None = no remat
        if policy_name is not None:
            policy = getattr(jax.checkpoint_policies, policy_name)
            layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=False)
        layer_kwargs = dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            dtype=self.dtype, param_dtype=self.param_dtype, attention_backend=self.attention_backend,
            cache_dtype=None if cache is None else jnp.dtype(cache.dtype), platform=self.platform)
        carry = (x, cache_k, cache_v)
        if self.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(**layer_kwargs, name="layers")
            layer_indices = jnp.arange(self.num_layers, dtype=jnp.int32)
            carry, _ = stack(carry, layer_indices, cos, sin, mask, write_index)
        else:
            for i in range(self.num_layers):  # static layer index: the cache update/read slices are static too
                carry, _ = layer_cls(**layer_kwargs, name=f"layers_{i}")(carry, i, cos, sin, mask, write_index)
        x, cache_k, cache_v = carry
        x = RMSNorm(self.hidden_size, self.rms_norm_eps, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)

        new_cache = None
        if isinstance(cache, PagedKVCache):
            new_cache = cache.replace(pages=cache_k, lengths=mask.kv_lens)
        elif cache is not None:
            new_cache = KVCache(k=cache_k, v=cache_v, segment_ids=mask.kv_segment_ids, length=write_index + length,
                                dtype=cache.dtype)
        return x, new_cache
