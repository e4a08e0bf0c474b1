"""Mesh construction, the logical-axis rule table, and shardings for params, optimizer state and batches."""
from omni_jax.sharding.mesh import make_mesh, maybe_initialize_distributed
from omni_jax.sharding.partition import (
    batch_sharding,
    logical_axes_tree,
    logical_shardings,
    opt_state_shardings,
    replicated,
    rules_context,
    spec_for,
)
from omni_jax.sharding.rules import LOGICAL_AXIS_RULES, MESH_AXES

__all__ = [
    "LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "logical_axes_tree", "logical_shardings", "make_mesh",
    "maybe_initialize_distributed", "opt_state_shardings", "replicated", "rules_context", "spec_for",
]
