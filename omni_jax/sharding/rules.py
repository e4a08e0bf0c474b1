"""The one table mapping logical axis names to mesh axes (data, fsdp, tensor).

Parameters use the plain names (`embed`, `heads`, ...); activations use `activation_*` names so that weights
can be FSDP-sharded on `embed` while activations stay sharded on the batch. Change the table (or pass your own
to the sharding helpers), not the model, to change the parallelism.
"""
from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or tuple of mesh axes or None)
LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    # a packed sequence of batch 1 (the vision encoder's patches of every image / video of a step): its positions
    # are split over the batch devices, so each encodes its share (not all of them, redundantly)
    ("activation_packed", ("data", "fsdp")),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # the fused head loss (models/linear_cross_entropy.py): a chunk's rows over `data`, the vocabulary over the
    # weight shards, so no device holds the whole [D, V] kernel or its gradient
    ("loss_rows", "data"),
    ("loss_vocab", ("fsdp", "tensor")),
    # inputs
    ("batch", ("data", "fsdp")),
    ("length", None),
)
