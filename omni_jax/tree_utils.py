"""Nested-dict param trees <-> flat {path tuple: leaf} maps (checkpoint and converter bookkeeping)."""
from __future__ import annotations

from typing import Any, Mapping


def flatten_params(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_params(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten_params(flat: Mapping[tuple, Any]) -> dict:
    """{path tuple: leaf} -> nested dict."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree
