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

Sharded (a mesh set, logical rules `loss_rows` and `loss_vocab` of omni_jax/sharding/rules.py), vocabulary-
parallel: the kernel is split over the vocabulary across the weight shards (fsdp x tensor) once; each chunk's
rows are gathered over fsdp (split over `data`), every device computes the logits of its vocabulary slice, and
the logsumexp, the target logit and the hidden-state gradient reduce over the slices ([C] and [C, D] values).
The kernel gradient stays in the device's slice ([G, D, V/shards], G = data, summed once after the scan). Chunk
k holds the rows k, k + N/C, k + 2N/C, ... (strided), so a chunk comes from every device evenly.
Measured with omni-jax compile (7B train preset, v6e:4x4, 16 x 8192): the first version, contiguous chunks with
the kernel split on its input dim, all-reduced every chunk's [C, V] float32 logits (139 GiB received per chip a
step); a gathered kernel with a per-device [D, V] float32 gradient moved ~5 GiB but held 3.3 GiB more per chip.
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


def _data_shards() -> int:
    """Size of the `data` axis of the mesh set by jax.set_mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(dict(mesh.shape).get("data", 1))


def _scan(hidden, kernel, targets, weights, chunk: int, with_grads: bool):
    """(weighted loss sum, unweighted per-token losses [N], d sum / d hidden [N, D] f32 or None,
    d sum / d kernel [D, V] f32 or None)."""
    n, dim = hidden.shape
    vocab = kernel.shape[1]
    w_kernel = constrain(kernel.astype(hidden.dtype), (None, "loss_vocab"))  # [D, V]: a vocabulary slice each
    xs = (_chunked(hidden, chunk), _chunked(targets.astype(jnp.int32), chunk), _chunked(weights.astype(jnp.float32), chunk))

    groups = _data_shards() if chunk % _data_shards() == 0 else 1  # G: a kernel-gradient slice per data shard
    vocab_ids = jnp.arange(vocab, dtype=jnp.int32)[None, :]  # [1, V]

    def body(d_kernel, chunk_xs):
        h, t, w = chunk_xs  # [C, D], [C], [C]
        h = constrain(h, ("loss_rows", None))
        logits = constrain(jnp.einsum("cd,dv->cv", h, w_kernel, preferred_element_type=jnp.float32),
                           ("loss_rows", "loss_vocab"))  # [C, V]
        log_z = jax.nn.logsumexp(logits, axis=-1)  # [C]
        # a masked sum, not a gather: the logits stay split over the vocabulary
        target_logit = jnp.sum(jnp.where(vocab_ids == t[:, None], logits, 0.0), axis=-1)
        losses = log_z - target_logit  # [C] unweighted
        if not with_grads:
            return d_kernel, (losses, None)
        # d losses_c / d logits = w_c * (softmax - onehot(t_c))
        d_logits = jnp.exp(logits - log_z[:, None]) * w[:, None]
        d_logits = d_logits - jnp.where(vocab_ids == t[:, None], w[:, None], 0.0)  # [C, V]
        d_logits = d_logits.astype(hidden.dtype)
        d_h = jnp.einsum("cv,dv->cd", d_logits, w_kernel, preferred_element_type=jnp.float32)  # [C, D]
        rows = lambda x: x.reshape((groups, -1) + x.shape[1:])  # noqa: E731  [G, C/G, ...]
        d_kernel = d_kernel + jnp.einsum("gcd,gcv->gdv", rows(h), rows(d_logits),
                                         preferred_element_type=jnp.float32)  # [G, D, V]: each data shard its rows
        return d_kernel, (losses, d_h)

    init = None
    if with_grads:
        init = constrain(jnp.zeros((groups, dim, vocab), jnp.float32), ("loss_rows", None, "loss_vocab"))
    d_kernel, (losses, d_h) = jax.lax.scan(body, init, xs)
    if with_grads:
        d_kernel = d_kernel.sum(axis=0)  # [D, V]: one reduction over the data shards
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
