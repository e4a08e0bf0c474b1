"""train.optimizer.clipped_adamw against optax's chain(clip_by_global_norm, adamw), and its skipped steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.optimizer import clipped_adamw

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=2, decay_steps=8, end_value=3e-3)
HYPER = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)


def _tree(seed, scale=1.0):
    r = np.random.default_rng(seed)
    return {"a": jnp.asarray(r.normal(size=(7, 5)) * scale, jnp.float32),
            "b": {"c": jnp.asarray(r.normal(size=(3,)) * scale, jnp.float32),
                  "d": jnp.asarray(r.normal(size=(2, 3, 4)) * scale, jnp.float32)}}


def _run(tx, params, grads_seq, applies=None):
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, a: tx.update(g, s, p, apply=a)) if applies is not None else \
        jax.jit(lambda g, s, p: tx.update(g, s, p))
    for i, grads in enumerate(grads_seq):
        if applies is None:
            updates, state = update(grads, state, params)
        else:
            updates, state = update(grads, state, params, jnp.asarray(applies[i]))
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("clip_norm, grad_scale", [(0.0, 1.0), (1.0, 0.01), (1.0, 5.0)])
def test_equals_optax_chain(clip_norm, grad_scale):
    """Same parameters as optax's chain after 6 steps (warmup + cosine, clipping off / inactive / active).
    Tolerance 2e-6 relative: the clip multiplies by c/||g|| where optax divides by ||g|| then multiplies by c
    (one rounding apart per step); everything else is the same arithmetic."""
    params = _tree(0)
    grads_seq = [_tree(10 + i, grad_scale) for i in range(6)]
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    reference = optax.chain(*parts, optax.adamw(SCHEDULE, **HYPER))
    want, _ = _run(reference, params, grads_seq)
    got, state = _run(clipped_adamw(SCHEDULE, clip_norm=clip_norm, **HYPER), params, grads_seq)
    assert int(state.count) == 6
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=1e-7)


def test_skipped_steps_leave_state_untouched_and_do_not_advance_the_schedule():
    """Steps with apply=False (here with NaN gradients) change nothing: the run with skips ends bit-identical
    to the run without those steps."""
    params = _tree(0)
    good = [_tree(10 + i) for i in range(4)]
    nan = jax.tree_util.tree_map(lambda x: x * jnp.nan, _tree(99))
    tx = clipped_adamw(SCHEDULE, clip_norm=1.0, **HYPER)
    want, want_state = _run(tx, params, good, applies=[True] * 4)
    got, got_state = _run(tx, params, [good[0], nan, good[1], good[2], nan, good[3]],
                          applies=[True, False, True, True, False, True])
    assert int(got_state.count) == 4
    for w, g in zip(jax.tree_util.tree_leaves((want, want_state)), jax.tree_util.tree_leaves((got, got_state))):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_frozen_leaves_under_multi_transform():
    """Under optax.multi_transform, frozen leaves get zero updates and the clip norm covers trained leaves only
    (as optax's chain under the same partition)."""
    params = _tree(0)
    labels = {"a": "train", "b": {"c": "frozen", "d": "train"}}
    grads_seq = [_tree(10 + i, 3.0) for i in range(3)]
    ours = optax.multi_transform({"train": clipped_adamw(SCHEDULE, clip_norm=1.0, **HYPER),
                                  "frozen": optax.set_to_zero()}, labels)
    reference = optax.multi_transform({"train": optax.chain(optax.clip_by_global_norm(1.0),
                                                            optax.adamw(SCHEDULE, **HYPER)),
                                       "frozen": optax.set_to_zero()}, labels)
    got, _ = _run(ours, params, grads_seq, applies=[True] * 3)
    want, _ = _run(reference, params, grads_seq)
    np.testing.assert_array_equal(np.asarray(got["b"]["c"]), np.asarray(params["b"]["c"]))
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=1e-7)
