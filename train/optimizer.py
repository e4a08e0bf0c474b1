"""Global-norm clipping + AdamW in one optax transformation, with an `apply` flag that skips a step.

    tx = clipped_adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0)
    updates, state = tx.update(grads, state, params, apply=finite)      # apply: [] bool
    params = optax.apply_updates(params, updates)

The math is optax's `chain(clip_by_global_norm(c), adamw(schedule, b1, b2, eps, weight_decay=wd))`:

    g' = g * min(1, c / ||g||)           (global norm over the leaves this transformation sees)
    mu = b1 mu + (1 - b1) g'             nu = b2 nu + (1 - b2) g'^2
    update = -schedule(count) * (mu / (1 - b1^(count+1)) / (sqrt(nu / (1 - b2^(count+1))) + eps) + wd p)

With apply=False, mu, nu and count keep their values and the update is 0 (the step never happened; the
schedule does not advance).

Why not the optax chain: a skipped step used to be a select between the new and the old optimizer state.
XLA then fused each new moment into the parameter update, which read the old moments, so it had to copy
mu and nu before overwriting them in place, and the clipped gradient (a division by the norm with two
consumers) became one more full-size temporary. On the 0.5B config (630 M float32 params) that optimizer
tail took 1.8-1.9 s on the 2-core CPU (docs/performance.md). Here each leaf's moments are selected first and
the update reads the selected moments, and the clip is a multiplication XLA fuses into its consumers: the tail
takes 0.3-0.45 s, with mu, nu and params each read and written once and the gradient read twice.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SkipsOnApply(optax.GradientTransformationExtraArgs):
    """A transformation whose `update(..., apply=False)` leaves its state untouched and returns zero updates.
    train.step.Trainer relies on that to skip a non-finite step without selecting over the whole state; any
    other optax transformation gets the select (see Trainer._train_step)."""


class ClippedAdamWState(NamedTuple):
    count: jax.Array  # [] int32: applied updates (skipped steps not counted)
    mu: Any  # first moments, the params' tree and dtypes
    nu: Any  # second moments


def clipped_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 1e-4, clip_norm: float = 0.0) -> SkipsOnApply:
    """AdamW with decoupled weight decay on every leaf and, for clip_norm > 0, global-norm clipping first;
    `update(..., apply=flag)` skips the step when flag is False (see the module docstring)."""
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        return ClippedAdamWState(count=jnp.zeros((), jnp.int32), mu=jax.tree_util.tree_map(jnp.zeros_like, params),
                                 nu=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state: ClippedAdamWState, params=None, *, apply=True, **unused_extra_args):
        if params is None:
            raise ValueError("clipped_adamw needs params (decoupled weight decay)")
        apply = jnp.asarray(apply, bool)
        if clip_norm > 0:
            norm = optax.tree.norm(grads)
            scale = jnp.minimum(1.0, clip_norm / norm)  # a multiplication XLA fuses into both moment updates
        else:
            scale = jnp.float32(1.0)
        count = state.count + 1
        bias1 = 1 - jnp.float32(b1) ** count.astype(jnp.float32)
        bias2 = 1 - jnp.float32(b2) ** count.astype(jnp.float32)
        lr = jnp.asarray(schedule(state.count), jnp.float32)

        def moment1(m, g):
            g = g * scale.astype(g.dtype)
            return jnp.where(apply, b1 * m + (1 - b1) * g.astype(m.dtype), m)

        def moment2(v, g):
            g = g * scale.astype(g.dtype)
            return jnp.where(apply, b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype)), v)

        mu = jax.tree_util.tree_map(moment1, state.mu, grads)
        nu = jax.tree_util.tree_map(moment2, state.nu, grads)

        def step(p, m, v):  # reads the selected moments: no copy of the old ones is needed
            u = (m / bias1) / (jnp.sqrt(v / bias2) + eps) + weight_decay * p
            return jnp.where(apply, -lr * u, 0).astype(p.dtype)

        updates = jax.tree_util.tree_map(step, params, mu, nu)
        return updates, ClippedAdamWState(count=jnp.where(apply, count, state.count), mu=mu, nu=nu)

    return SkipsOnApply(init, update)
