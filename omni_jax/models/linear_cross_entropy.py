"""Fused lm_head + cross-entropy over token chunks: the [N, V] logits are never held whole.

With Qwen's 152k vocabulary the logits of a 512-token row are 311 MB in float32; plain autodiff keeps them (and
several same-size temporaries: softmax, its gradient) alive between forward and backward, and every pass over
them runs at fresh-buffer speed on CPU. Here a `lax.scan` walks chunks of `chunk` tokens; when differentiated,
the forward pass also forms each chunk's gradient (softmax - one-hot) and immediately contracts it into the
hidden-state and kernel gradients, so the backward pass is a scaling by the incoming cotangent. FLOPs equal
those of forward + backward of the unfused head (no recomputation).

    loss = linear_cross_entropy(hidden [N, D], kernel [D, V], targets [N] int, weights [N] float, chunk)
         = sum_i weights_i * (logsumexp(hidden_i @ kernel) - (hidden_i @ kernel)[targets_i])

The matmuls run in hidden.dtype with float32 accumulation (as models.layers.Einsum); softmax math in float32.

Sharded (a mesh set, the rows of `hidden` sharded on the batch as the train step's are): chunk k holds the rows
k, k + N/C, k + 2N/C, ... (strided, not contiguous), so every chunk is spread over all devices and each device
works on its own rows at every step; the kernel is gathered once before the scan (FSDP), not reduced per chunk,
and the kernel gradient is accumulated per batch shard ([G, D, V], G = data x fsdp, one slice per device) and
summed once after the scan. With contiguous chunks a chunk lived on one device and the compiler all-reduced
every chunk's [C, V] float32 logits over the batch shards (139 GiB per chip per step for the 7B train preset on
v6e:4x4, omni-jax compile); with a [D, V] carry it all-reduced the kernel gradient at every chunk instead.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from omni_jax.models.layers import constrain


def _chunked(x: jax.Array, chunk: int, fill=0) -> jax.Array:
    """[N, ...] -> [ceil(N / chunk), chunk, ...] with chunk k = rows k, k + n, k + 2n, ... (n = the number of
    chunks), N padded up to a multiple of chunk with `fill`; rows sharded in contiguous blocks stay sharded on the
    chunk's row axis."""
    pad = -x.shape[0] % chunk
    if pad:
        x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    x = x.reshape((chunk, -1) + x.shape[1:])  # [chunk, n, ...]: row c * n + k at [c, k]
    x = constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1))
    return jnp.swapaxes(x, 0, 1)  # [n, chunk, ...]


def _unchunked(x: jax.Array, n: int) -> jax.Array:
    """Inverse of `_chunked` ([n_chunks, chunk, ...] -> [n, ...])."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])[:n]


def _batch_shards() -> int:
    """Devices the batch is split over (data x fsdp of the mesh set by jax.set_mesh; 1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    shape = dict(mesh.shape)
    return int(shape.get("data", 1) * shape.get("fsdp", 1))


def _scan(hidden, kernel, targets, weights, chunk: int, with_grads: bool):
    """(weighted loss sum, unweighted per-token losses [N], d sum / d hidden [N, D] f32 or None,
    d sum / d kernel [D, V] f32 or None)."""
    n, dim = hidden.shape
    vocab = kernel.shape[1]
    # gathered over the batch shards once (FSDP), sharded on the vocabulary as the lm_head
    w_kernel = constrain(kernel.astype(hidden.dtype), (None, "vocab"))
    xs = (_chunked(hidden, chunk), _chunked(targets.astype(jnp.int32), chunk), _chunked(weights.astype(jnp.float32), chunk))

    groups = _batch_shards() if chunk % _batch_shards() == 0 else 1  # G: a kernel-gradient slice per batch shard

    def body(d_kernel, chunk_xs):
        h, t, w = chunk_xs  # [C, D], [C], [C]
        logits = jnp.einsum("cd,dv->cv", h, w_kernel, preferred_element_type=jnp.float32)  # [C, V]
        log_z = jax.nn.logsumexp(logits, axis=-1)  # [C]
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        losses = log_z - target_logit  # [C] unweighted
        if not with_grads:
            return d_kernel, (losses, None)
        # d losses_c / d logits = w_c * (softmax - onehot(t_c))
        d_logits = jnp.exp(logits - log_z[:, None]) * w[:, None]
        d_logits = d_logits - jax.nn.one_hot(t, vocab, dtype=jnp.float32) * w[:, None]  # [C, V]
        d_logits = d_logits.astype(hidden.dtype)
        d_h = jnp.einsum("cv,dv->cd", d_logits, w_kernel, preferred_element_type=jnp.float32)  # [C, D]
        grouped = lambda x: constrain(x.reshape((groups, -1) + x.shape[1:]), ("activation_batch", None, None))  # noqa: E731
        d_kernel = d_kernel + jnp.einsum("gcd,gcv->gdv", grouped(h), grouped(d_logits),
                                         preferred_element_type=jnp.float32)  # [G, D, V]: each shard its rows'
        return d_kernel, (losses, d_h)

    init = None
    if with_grads:
        init = constrain(jnp.zeros((groups, dim, vocab), jnp.float32), ("activation_batch", None, "vocab"))
    d_kernel, (losses, d_h) = jax.lax.scan(body, init, xs)
    if with_grads:
        # [D, V]: one reduction over the batch shards, landing sharded as the lm_head kernel (a reduce-scatter)
        d_kernel = constrain(d_kernel.sum(axis=0), ("embed", "vocab"))
    losses = _unchunked(losses, n)
    if with_grads:
        d_h = _unchunked(d_h, n)
    return jnp.sum(losses * weights.astype(jnp.float32)), losses, d_h, d_kernel


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array,
                         chunk: int = 128) -> jax.Array:
    """Weighted sum of token cross-entropies of `hidden @ kernel` (see the module docstring). -> [] float32."""
    return _scan(hidden, kernel, targets, weights, chunk, with_grads=False)[0]


def _forward(hidden, kernel, targets, weights, chunk):
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
    total, unweighted, d_h, d_kernel = _scan(hidden, kernel, targets, weights, chunk, with_grads=True)
    # residuals (the unweighted per-token losses are the weights' cotangent) in the dtypes of the primal inputs (the cotangents' dtypes)
    return total, (d_h.astype(hidden.dtype), d_kernel.astype(kernel.dtype), unweighted.astype(weights.dtype))


def _backward(chunk, residuals, g):
    d_h, d_kernel, unweighted = residuals
    return (g.astype(d_h.dtype) * d_h, g.astype(d_kernel.dtype) * d_kernel, None, g.astype(unweighted.dtype) * unweighted)


linear_cross_entropy.defvjp(_forward, _backward)
