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
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _chunked(x: jax.Array, chunk: int, fill=0) -> jax.Array:
    """[N, ...] -> [N / chunk, chunk, ...], padding N up to a multiple of chunk with `fill`."""
    pad = -x.shape[0] % chunk
    if pad:
        x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x.reshape((-1, chunk) + x.shape[1:])


def _scan(hidden, kernel, targets, weights, chunk: int, with_grads: bool):
    """(weighted loss sum, unweighted per-token losses [N], d sum / d hidden [N, D] f32 or None,
    d sum / d kernel [D, V] f32 or None)."""
    n, dim = hidden.shape
    vocab = kernel.shape[1]
    w_kernel = kernel.astype(hidden.dtype)
    xs = (_chunked(hidden, chunk), _chunked(targets.astype(jnp.int32), chunk), _chunked(weights.astype(jnp.float32), chunk))

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
        d_kernel = d_kernel + jnp.einsum("cd,cv->dv", h, d_logits, preferred_element_type=jnp.float32)
        return d_kernel, (losses, d_h)

    init = jnp.zeros((dim, vocab), jnp.float32) if with_grads else None
    d_kernel, (losses, d_h) = jax.lax.scan(body, init, xs)
    losses = losses.reshape(-1)[:n]
    if with_grads:
        d_h = d_h.reshape(-1, dim)[:n]
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
