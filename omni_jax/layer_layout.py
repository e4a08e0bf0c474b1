"""Stacked <-> per-layer parameter layouts of the text decoders (RuntimeOptions.scan_layers).

Scanned decoders hold `.../layers/<param>` with a leading [num_layers] axis; unrolled ones hold
`.../layers_0/<param>`, `.../layers_1/<param>`, ... Checkpoints (and the HF converter) use the stacked layout;
a serving model built with scan_layers=False converts once at load time.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

_LAYER_KEY = re.compile(r"layers_(\d+)$")


def _per_layer_count(keys) -> int:
    return sum(1 for k in keys if isinstance(k, str) and _LAYER_KEY.match(k))


def match_layer_layout(params: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict:
    """`params` with every decoder layer block rearranged to the layout of `wanted` (a tree of the same module,
    e.g. its abstract init): `layers` [L, ...] -> `layers_0..layers_{L-1}` where wanted is unrolled, and back
    where wanted is stacked. Everything else is passed through unchanged (shape checks are the caller's)."""
    out = {}
    for key, value in params.items():
        if not isinstance(value, Mapping):
            out[key] = value
            continue
        if key == "layers" and "layers" not in wanted and _per_layer_count(wanted):
            num_layers = _per_layer_count(wanted)
            depth = {int(np.shape(leaf)[0]) for leaf in jax.tree_util.tree_leaves(value)}
            if depth != {num_layers}:
                raise ValueError(f"stacked layers have leading sizes {sorted(depth)}; the model has {num_layers} "
                                 "layers")
            for i in range(num_layers):
                out[f"layers_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], value)
            continue
        if _LAYER_KEY.match(key) and "layers" in wanted and key not in wanted:
            continue  # stacked below, once, from all layers_i
        out[key] = match_layer_layout(value, wanted.get(key, {}) if isinstance(wanted.get(key), Mapping) else {})
    if "layers" in wanted and "layers" not in params and _per_layer_count(params):
        num_layers = _per_layer_count(params)
        blocks = [params[f"layers_{i}"] for i in range(num_layers)]
        out["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
    return out
