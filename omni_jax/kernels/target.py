"""The platform a program is compiled for, and the one switch that every kernel / path choice follows.

A program's paths are chosen by its target, never by the host: an ahead-of-time compile for a TPU slice made on a
CPU host (devices of `jax.experimental.topologies.get_topology_desc`, `JAX_PLATFORMS=cpu`) must be the TPU
program. So no module asks `jax.default_backend()`; each takes a platform (`RuntimeOptions.platform`, a module
attribute or a function argument) and asks this module.

Platforms: "cpu", "gpu", "tpu", or "auto", which `resolve_platform` turns into one of the others. The entry
points that own a mesh or devices (`OmniModel`, `SpeechModel`, `train.step.Trainer`) resolve "auto" once and build
their modules with the concrete value; "auto" reaching a module (a module or function used directly, as the
tests do) is resolved where the choice is made, from the mesh set by `jax.set_mesh` if there is one, else from
the first of `jax.devices()`.

The switch, `cpu_paths(platform)`: true only for the CPU. Behind it sits all machinery that exists for XLA:CPU
and is wrong or useless elsewhere:
  * the hand-written CPU kernels (`small_batch_matmul`, `cache_attention`) and the decode layout of weights that
    feeds them, held in huge pages (`models.decode_layout`, `kernels.huge_pages`);
  * the blocked online-softmax attention and the multiply-reduce decode attention (`models.attention`);
  * the bfloat16 second-row padding of single-row projections and the optimization barrier of `take_rows`
    (`models.layers`);
  * 16-bit KV caches held as uint16 bits and the uint16 view of slot writes (`models.kv_cache`);
  * Pallas kernels in interpret mode (`pallas_interpret`).
A TPU or GPU program contains none of it.
"""
from __future__ import annotations

from typing import Any

import jax

PLATFORMS = ("auto", "cpu", "gpu", "tpu")
_DEVICE_PLATFORMS = {"cpu": "cpu", "tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def check_platform(platform: Any, what: str = "platform") -> str:
    """`platform` if it is one of PLATFORMS; else a ValueError that names `what` and the allowed values."""
    if platform not in PLATFORMS:
        raise ValueError(f"{what} = {platform!r}; expected one of {list(PLATFORMS)}")
    return platform


def _device_platform(name: str, where: str) -> str:
    """A device's platform name ("cuda" and "rocm" are "gpu") as one of the concrete PLATFORMS."""
    if name not in _DEVICE_PLATFORMS:
        raise ValueError(f"the devices of {where} are on platform {name!r}, which has no kernel paths here; "
                         f"expected one of {sorted(_DEVICE_PLATFORMS)}")
    return _DEVICE_PLATFORMS[name]


def resolve_platform(options_or_platform: Any = "auto", mesh: jax.sharding.Mesh | None = None) -> str:
    """The concrete platform ("cpu", "gpu" or "tpu") of a `RuntimeOptions` (its `platform`) or a platform string.

    An explicit value is returned as is. "auto" is the platform of `mesh`'s devices when a mesh is given; else of
    the mesh set by `jax.set_mesh` (its abstract device); else of the first of `jax.devices()`."""
    platform = check_platform(getattr(options_or_platform, "platform", options_or_platform))
    if platform != "auto":
        return platform
    if mesh is not None and mesh.devices.size:
        return _device_platform(mesh.devices.flat[0].platform, "the mesh")
    abstract = jax.sharding.get_abstract_mesh()
    device = None if abstract.empty else abstract.abstract_device
    if device is not None and getattr(device, "platform", None):
        return _device_platform(device.platform, "the mesh set by jax.set_mesh")
    return _device_platform(jax.devices()[0].platform, "jax.devices()")


def cpu_paths(platform: str) -> bool:
    """The one switch: whether a program for `platform` takes the CPU-only paths (module docstring)."""
    return resolve_platform(platform) == "cpu"


def pallas_interpret(platform: str) -> bool:
    """Whether Pallas kernels run in interpret mode (plain XLA ops): on the CPU, which has no Mosaic."""
    return cpu_paths(platform)
