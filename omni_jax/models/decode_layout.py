"""The decode layout of projection weights: "kernel_t" [out..., in...] in place of "kernel" [in..., out...].

A decode step multiplies a few rows by every weight of the language model. On the CPU these products run on
`omni_jax.kernels.small_batch_matmul`, which takes each output as the dot product of two contiguous rows, so it
needs the weight with its contracted (input) dims last. Converting a param tree once, when a model is loaded for
serving (`OmniModel`, `SpeechModel`), costs one transposed copy of those weights (held instead of the original
once loading is done; both exist while it runs) and nothing per step. The `Einsum` layer takes either layout;
prefill and full-sequence passes run XLA's einsum on "kernel_t" as well. Each converted weight is held in
transparent huge pages (`omni_jax.kernels.huge_pages`): a streaming read of them is ~10% faster, a batch-1 decode
step 3-4% (docs/performance.md).

Training, checkpoints and the HF converter keep the standard layout; so does a sharded model (the kernel does not
run on a multi-device mesh: `applies`) and a program for any platform but the CPU.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.kernels import build, huge_pages, small_batch_matmul, target
from omni_jax.models.layers import Einsum

Path = tuple[str, ...]


def applies(platform: str = "auto") -> bool:
    """Whether a model loaded now for a program on `platform` should take the decode layout: a CPU program
    (`omni_jax.kernels.target.cpu_paths`), the kernel built, no multi-device mesh set."""
    return target.cpu_paths(platform) and not build.multi_device_mesh() and small_batch_matmul.available()


def projection_equations(init_fn: Callable[[], Any]) -> dict[Path, str]:
    """{param path of an `Einsum`: its equation} for every Einsum `init_fn` (a module's init; run abstractly here,
    no arrays are made) creates. The path of a scanned layer's Einsum is that of its stacked param."""
    found: dict[Path, str] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Einsum) and context.method_name == "__call__":
            found[tuple(context.module.path)] = context.module.equation
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(init_fn)
    return found


def to_decode_layout(params: Mapping[str, Any], equations: Mapping[Path, str],
                     prefixes: Sequence[Path] = ((),)) -> dict:
    """`params` (a module's "params" tree) with every Einsum kernel under one of `prefixes` that has a canonical
    equation (rows then contracted dims in x, contracted dims first in the weight) stored as "kernel_t": the
    contracted dims moved last, as a new contiguous array. Leading dims beyond the Einsum's own (stacked layers)
    stay first. Other leaves are passed through unchanged; a tree already in the decode layout is returned as is."""

    def convert(tree: Mapping[str, Any], path: Path) -> dict:
        out = {}
        for name, value in tree.items():
            here = path + (name,)
            if isinstance(value, Mapping):
                out[name] = convert(value, here)
            elif name == "kernel" and path in equations and any(path[:len(p)] == p for p in prefixes):
                out.update(_transposed(value, equations[path]))
            else:
                out[name] = value
        return out

    return convert(params, ())


def _transposed(kernel, equation: str) -> dict:
    """{"kernel_t": kernel in the decode layout}, or {"kernel": kernel} where the equation is not canonical."""
    split = small_batch_matmul.canonical_split(equation)
    if split is None:
        return {"kernel": kernel}
    contracted = split[1]  # canonical: the weight's leading dims
    lead = kernel.ndim - len(equation.replace(" ", "").split("->")[0].split(",")[1])  # stacked layers
    order = (tuple(range(lead)) + tuple(range(lead + contracted, kernel.ndim))
             + tuple(range(lead, lead + contracted)))
    # one compiled transpose per (shape, order), reused; then held in huge pages (the decode step streams it)
    return {"kernel_t": huge_pages.hold(jnp.transpose(kernel, order))}
