"""Device meshes from configuration, single- or multi-host."""
from __future__ import annotations

import logging
import os
from typing import Mapping

import jax
from jax.sharding import AxisType, Mesh

from omni_jax.sharding.rules import MESH_AXES

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> None:
    """Call `jax.distributed.initialize()` for multi-process runs; single-process runs skip it.

    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID name the processes explicitly (any cluster,
    e.g. several processes on one machine); on Cloud TPU pods (or with JAX_COORDINATOR_ADDRESS alone) JAX
    discovers the rest. JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo gives CPU devices cross-process collectives.
    """
    if jax.distributed.is_initialized():
        return
    impl = os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION")
    if impl:
        jax.config.update("jax_cpu_collectives_implementation", impl)
    address, count, index = (os.environ.get(k) for k in
                             ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    if address and count and index is not None:
        jax.distributed.initialize(address, num_processes=int(count), process_id=int(index))
    elif address or tpu_pod:
        jax.distributed.initialize()
    else:
        return
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over (data, fsdp, tensor) with Auto axis types (what Linen's logical constraints need).

    `shape` maps axis name to size; at most one size may be -1 (takes the remaining devices). Missing axes are
    1. The default puts every device on `fsdp`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = 1
    for s in sizes:
        total *= s
    if total != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
