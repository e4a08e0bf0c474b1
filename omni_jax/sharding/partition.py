"""Shardings for params, optimizer state and batches, derived from the logical axis annotations."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax.sharding.rules import LOGICAL_AXIS_RULES


def _mesh_axes_for(logical: str | None, rules) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, target in rules:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    return ()


def spec_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for an array, dropping mesh axes that do not divide the dimension (replicate instead).

    E.g. 2 KV heads on a tensor axis of 4 stay replicated rather than failing; a mesh axis is used at most once,
    and one the mesh lacks is skipped. `mesh` may be a Mesh or an AbstractMesh.
    """
    used: set[str] = set()
    spec = []
    for dim, logical in zip(shape, logical_axes):
        chosen = []
        size = 1
        for axis in _mesh_axes_for(logical, rules):
            n = mesh.shape.get(axis, 1)
            if axis in used or n == 1:
                continue
            if dim % (size * n) == 0:
                chosen.append(axis)
                size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree whose leaves are `nn.Partitioned` boxes (from `jax.eval_shape(model.init)`).

    Unboxed leaves (no annotation) are replicated. The result has the unboxed tree structure.
    """

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            value = leaf.value
            return NamedSharding(mesh, spec_for(value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_axes_tree(abstract_tree: Any) -> Any:
    """The logical axis names of every leaf (None for unannotated leaves), unboxed structure."""
    return jax.tree_util.tree_map(
        lambda leaf: tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Shard the batch dimension over (data, fsdp); replicate the rest."""
    spec = [None] * ndim
    axes = tuple(a for a in _mesh_axes_for("batch", rules) if mesh.shape[a] > 1)
    spec[batch_axis] = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(opt_state_abstract: Any, params_abstract: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer-state shardings: a state leaf whose key path ends with a param's path (optax's mu, nu, ...
    mirror the param tree) and has its shape takes that param's sharding; other leaves (counts) replicate."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    flat_shardings = jax.tree_util.tree_leaves(param_shardings)
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
        by_path[tuple(str(k) for k in path)] = (tuple(leaf.shape), sharding)

    def one(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, opt_state_abstract)


def rules_context(rules=LOGICAL_AXIS_RULES):
    """Context manager that makes `nn.with_logical_constraint` use `rules`."""
    return nn.logical_axis_rules(rules)
