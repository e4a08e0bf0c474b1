"""Multi-process media: every process gets the pipeline batches of all processes (host-side all-gather).

In a multi-process run each process reads its own rows (per-host data sharding). Token arrays become global
arrays sharded on the batch dimension without any copy, but the encoders' inputs are replicated over the mesh
(the encoders run on every device and their outputs are scattered into the placeholder positions of the whole
global batch), so each process needs the media of every process, in process order (the order of the global
rows). `gather_batch` does that with `multihost_utils.process_allgather`: shapes first, then each array padded
to the largest process's shape, gathered, and the padding cut off again. Padded trailing dims are zeros, which
the masks already mean as "no data" (audio frames beyond feature_attention_mask, grid rows of zeros).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

ROW_KEYS_AXIS = {"positions": 1, "talker_positions": 1}  # row arrays whose batch axis is not the first
MEDIA = {"input_features": (3, np.float32), "feature_attention_mask": (2, np.int32), "pixel_values": (2, np.float32),
         "image_grid_thw": (2, np.int64), "pixel_values_videos": (2, np.float32), "video_grid_thw": (2, np.int64),
         "video_second_per_grid": (1, np.float32)}  # key -> (ndim, dtype); concatenated on their first axis


def _allgather(x: np.ndarray) -> np.ndarray:
    """[...] on every process -> [num_processes, ...] (same shape and dtype on every process)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def _gather_ragged(x: np.ndarray, axis: int) -> np.ndarray:
    """Concatenate every process's `x` along `axis`; the processes' shapes may differ in every dim (other dims
    are zero-padded to the largest)."""
    shapes = _allgather(np.asarray(x.shape, np.int64))  # [P, ndim]
    biggest = shapes.max(axis=0)
    padded = np.zeros(tuple(int(s) for s in biggest), x.dtype)
    padded[tuple(slice(0, s) for s in x.shape)] = x
    gathered = _allgather(padded)  # [P, *biggest]
    parts = []
    for p, shape in enumerate(shapes):
        index = [slice(None)] * x.ndim
        index[axis] = slice(0, int(shape[axis]))
        parts.append(gathered[p][tuple(index)])
    return np.concatenate(parts, axis=axis)


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on some process (a collective: every process must call it)."""
    return bool(_allgather(np.asarray([flag], np.int32)).any())


def has_media(batch: Mapping[str, Any]) -> bool:
    return any(batch.get(key) is not None for key in MEDIA)


def gather_batch(batch: Mapping[str, Any]) -> dict:
    """This process's pipeline batch -> the batch of all processes (rows and media in process order).

    Row arrays ([B, ...] token arrays, [3, B, L] positions) are concatenated on their batch axis, media on their
    first axis; a modality one process lacks is an empty array there. Scalars (counters) are left local."""
    out: dict[str, Any] = {}
    rows = np.shape(batch["input_ids"])[0]
    for key, value in batch.items():
        if key in MEDIA or value is None:
            continue
        value = np.asarray(value)
        if key in ROW_KEYS_AXIS:
            out[key] = _gather_ragged(value, ROW_KEYS_AXIS[key])
        elif value.ndim >= 1 and value.shape[0] == rows:
            out[key] = _gather_ragged(value, 0)
        else:
            out[key] = value
    for key, (ndim, dtype) in MEDIA.items():
        value = batch.get(key)
        local = np.zeros((0,) * ndim, dtype) if value is None else np.asarray(value).astype(dtype)
        merged = _gather_ragged(local, 0)
        out[key] = merged if merged.shape[0] else None
    return out


def local_rows(host_batch: Mapping[str, Any], process_index: int, num_processes: int,
               token_keys, position_keys) -> dict:
    """A stacked global host batch ([k, B_global, ...] tokens, [k, 3, B_global, L] positions) -> this process's
    rows of the token arrays (what `batches.to_global` expects); encoder inputs are kept whole."""
    out = dict(host_batch)
    for key in token_keys:
        if key in out:
            n = out[key].shape[1] // num_processes
            out[key] = out[key][:, process_index * n:(process_index + 1) * n]
    for key in position_keys:
        if key in out:
            n = out[key].shape[2] // num_processes
            out[key] = out[key][:, :, process_index * n:(process_index + 1) * n]
    return out
