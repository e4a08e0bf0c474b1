"""A TPU slice described by name ("v6e:4x4"), without the TPU: compile-only devices from libtpu, HBM per chip,
and the (data, fsdp, tensor) mesh over them.

    tpu = load_topology("v5e:2x2", num_slices=1)        # 4 compile-only devices, 16 GiB each
    mesh = slice_mesh(tpu, {"fsdp": 2, "tensor": 2})

Multi-slice (--num-slices N > 1): slices talk over the data-center network, so only the `data` axis crosses
them (data = N x the data parallelism inside a slice), as in MaxText's hybrid meshes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

from omni_jax.sharding.rules import MESH_AXES

GiB = 1024 ** 3

# HBM of one chip by jax device_kind (public Cloud TPU specs).
HBM_BYTES_PER_CHIP = {
    "TPU v2": 16 * GiB,
    "TPU v3": 32 * GiB,
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5e": 16 * GiB,
    "TPU v5": 95 * GiB,  # v5p
    "TPU v5p": 95 * GiB,
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
    "TPU v6e": 32 * GiB,
}
# v4 chips have two TensorCores that JAX drives as one device ("megacore"); libtpu's compile-only topology shows
# each core as a device unless asked for the megacore chip config.
MEGACORE_GENERATIONS = ("v4",)
EXAMPLES = "v5e:2x2, v5e:4x4, v6e:2x2, v6e:4x4, v6e:8x8, v5p:2x2x1, v5p:4x4x4, v4:2x2x1"


class TopologyError(ValueError):
    """An unknown topology name, or a mesh that does not fit the slice (a one-line message for people)."""


@dataclasses.dataclass(frozen=True)
class TpuSlices:
    name: str  # e.g. "v6e:4x4"
    num_slices: int
    devices: tuple  # compile-only jax devices of every slice
    device_kind: str  # e.g. "TPU v6 lite"
    hbm_bytes: Optional[int]  # per device (= per chip, or per core where a chip is several devices); None: unknown

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def _generation(name: str) -> str:
    return name.split(":")[0].split("_")[0].lower()


def load_topology(name: str, num_slices: int = 1, hbm_gib: Optional[float] = None) -> TpuSlices:
    """Compile-only devices of `num_slices` slices of topology `name` (libtpu must be installed).

    hbm_gib overrides the HBM per device (for chips missing from HBM_BYTES_PER_CHIP)."""
    import os

    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the chips it drives; a compile-only load drives
    # none, so it must not fail beside a running job (or another compile) that holds the lock. Read when libtpu
    # loads, i.e. at the first topology request of the process.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    if num_slices < 1:
        raise TopologyError(f"--num-slices must be >= 1, got {num_slices}")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    if _generation(name) in MEGACORE_GENERATIONS:
        kwargs["chip_config_name"] = "megacore"
    try:
        devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)
    except Exception as e:  # JaxRuntimeError INVALID_ARGUMENT from libtpu, or no libtpu at all
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "libtpu" in first_line.lower() or "tpu backend" in first_line.lower() or isinstance(e, ImportError):
            raise TopologyError(f"cannot describe TPU topology {name!r}: {first_line} (install libtpu: "
                                f"pip install 'omni-jax[tpu]')") from None
        raise TopologyError(f"unknown TPU topology {name!r} ({first_line}); expected GENERATION:CHIPS, e.g. "
                            f"{EXAMPLES}") from None
    kind = devices[0].device_kind
    if hbm_gib is not None:
        hbm = int(hbm_gib * GiB)
    elif kind in HBM_BYTES_PER_CHIP:
        hbm = HBM_BYTES_PER_CHIP[kind] // _devices_per_chip(devices)
    else:
        hbm = None
    return TpuSlices(name=name, num_slices=num_slices, devices=devices, device_kind=kind, hbm_bytes=hbm)


def _devices_per_chip(devices) -> int:
    """How many jax devices share one chip (2 for v2/v3 cores, 1 for megacore and single-core chips)."""
    chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
    return max(1, len(devices) // len(chips))


def parse_mesh(text: str) -> dict:
    """"data=2,fsdp=4,tensor=2" -> {"data": 2, "fsdp": 4, "tensor": 2} (one size may be -1: the rest)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, size = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise TopologyError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                                f"{', '.join(MESH_AXES)}, e.g. data=1,fsdp=4,tensor=2")
        out[name] = int(size)
    return out


def _resolve_sizes(shape: Mapping[str, int], count: int) -> dict:
    """Axis sizes over MESH_AXES with -1 resolved; a product that differs from `count` is an error."""
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise TopologyError(f"mesh {dict(shape)}: sizes must be positive, with at most one -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if count % known:
            raise TopologyError(f"mesh {dict(shape)} does not divide the {count} chips of this topology")
        sizes[free[0]] = count // known
    if math.prod(sizes.values()) != count:
        described = "x".join(f"{axis}={size}" for axis, size in sizes.items())
        raise TopologyError(f"mesh {described} has {math.prod(sizes.values())} devices but the topology has "
                            f"{count}; the sizes must multiply to {count}")
    return sizes


def slice_mesh(tpu: TpuSlices, shape: Optional[Mapping[str, int]] = None):
    """The (data, fsdp, tensor) mesh with Auto axes over the slices' devices (default: data = slices, fsdp =
    the rest)."""
    import jax
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    shape = dict(shape or {"data": tpu.num_slices, "fsdp": -1})
    sizes = _resolve_sizes(shape, tpu.num_devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if tpu.num_slices == 1:
        return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=axis_types, devices=list(tpu.devices))
    if sizes["data"] % tpu.num_slices:
        raise TopologyError(f"--num-slices {tpu.num_slices}: the data axis ({sizes['data']}) must be a multiple of "
                            f"{tpu.num_slices}; only data parallelism crosses slices")
    inside = (sizes["data"] // tpu.num_slices, sizes["fsdp"], sizes["tensor"])  # ICI, within a slice
    across = (tpu.num_slices, 1, 1)  # DCN, between slices
    devices = mesh_utils.create_hybrid_device_mesh(inside, across, devices=list(tpu.devices))
    return Mesh(np.asarray(devices), MESH_AXES, axis_types=axis_types)
