"""Host side of a train step: pipeline batches (numpy, the data contract) -> stacked microbatches on the mesh.

A pipeline batch (see docs/data.md) has `input_ids`, `targets`, `loss_mask`, `segment_ids` [B, L],
`positions` [3, B, L] (per-segment TMRoPE), optional media arrays with HF processor names, concatenated
over the batch's samples in placeholder order, and optionally the talker view (talker_* [B, Lt],
talker_positions [3, B, Lt]; omni_jax/data/talker_view.py). When one microbatch of a step has the talker
view, the others get an empty one (no talker loss tokens), so the step has one structure.
Here each microbatch gets its encoder plans (audio chunks, vision windows), the k microbatches of one step
are padded to common encoder shapes and stacked on a leading [k] axis (the train step scans over it), and
the result becomes global jax.Arrays: token arrays sharded on the batch dimension, encoder inputs replicated.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from omni_jax.data.talker_view import TALKER_KEYS, empty_view
from omni_jax.model_inputs import AUDIO_CHUNK_BUCKET, next_power_of_two
from omni_jax.models.audio_encoder import plan_audio_chunks
from omni_jax.models.thinker import MultimodalAudio, MultimodalVision
from omni_jax.models.vision_encoder import plan_vision
from omni_jax.sharding import batch_sharding, replicated

TOKEN_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids") + TALKER_KEYS  # [k, B, L] / [k, B, Lt]
POSITION_KEYS = ("positions", "talker_positions")  # [k, 3, B, L] / [k, 3, B, Lt]
_DTYPES = {**{key: np.int32 for key in TOKEN_KEYS}, "loss_mask": np.float32, "talker_loss_mask": np.float32}


def _count(ids: np.ndarray, token_id: int) -> int:
    return int((ids == token_id).sum())


def _audio_chunks(batch: Mapping[str, Any], cfg) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(chunks [C, n_mels, 2*n_window], chunk_lengths [C]) of the batch's real clips, or None without audio.

    Bucket-padding clips (feature_attention_mask all 0) are dropped: they have no placeholder tokens."""
    ids = np.asarray(batch["input_ids"])
    placeholders = _count(ids, cfg.audio_token_index)
    if batch.get("input_features") is None:
        if placeholders:
            raise ValueError(f"batch has {placeholders} audio placeholder tokens but no input_features")
        return None
    features = np.asarray(batch["input_features"], np.float32)
    mask = np.asarray(batch["feature_attention_mask"])
    real = mask.sum(-1) > 0
    if not real.any():
        if placeholders:
            raise ValueError(f"batch has {placeholders} audio placeholder tokens but every audio clip is empty")
        return None
    plan = plan_audio_chunks(features[real], mask[real], chunk_bucket=AUDIO_CHUNK_BUCKET, n_window=cfg.audio.n_window)
    if plan.num_tokens != placeholders:
        raise ValueError(f"batch has {placeholders} audio placeholder tokens but its clips give {plan.num_tokens} "
                         f"(per clip: {plan.tokens_per_sample.tolist()})")
    return plan.chunks, plan.chunk_lengths


def _vision_items(batch: Mapping[str, Any], cfg, pixel_key: str, grid_key: str, token_id: int, what: str):
    """(pixel_values [N_real, C*T*P*P], grid [n, 3]) of the real items, or None."""
    ids = np.asarray(batch["input_ids"])
    placeholders = _count(ids, token_id)
    if batch.get(pixel_key) is None:
        if placeholders:
            raise ValueError(f"batch has {placeholders} {what} placeholder tokens but no {pixel_key}")
        return None
    grid = np.asarray(batch[grid_key], np.int64).reshape(-1, 3)
    grid = grid[np.prod(grid, axis=1) > 0]  # all-zero rows: bucket padding
    pixels = np.asarray(batch[pixel_key], np.float32)
    real = int(np.prod(grid, axis=1).sum())
    if pixels.shape[0] < real:
        raise ValueError(f"{pixel_key} has {pixels.shape[0]} patches but {grid_key} {grid.tolist()} needs {real}")
    tokens = real // cfg.vision.spatial_merge_size ** 2
    if tokens != placeholders:
        raise ValueError(f"batch has {placeholders} {what} placeholder tokens but {grid_key} {grid.tolist()} "
                         f"gives {tokens}")
    if not len(grid):
        return None
    return pixels[:real], grid


def stack_microbatches(micro: Sequence[Mapping[str, Any]], thinker_config,
                       media_buckets: Optional[Mapping[str, int]] = None) -> dict:
    """k pipeline batches (each [B_micro, L]) -> one host pytree with a leading [k] axis.

    Encoder inputs are padded to the largest microbatch (audio chunks of length 0, vision patch buckets), so
    the k microbatches share one shape; a microbatch without a modality another one has gets empty inputs
    (no placeholders, so nothing is scattered).

    media_buckets ({"audio_chunks": n, "image_patches": n, "video_patches": n}): a modality named there is
    always present (empty stand-in when the batch has none) and padded to at least that size (else to the
    next power of two above it), so a run compiles one step program instead of one per modality mix and
    size. The shapes depend only on the batch itself, never on earlier batches (resume stays bit-exact)."""
    cfg = thinker_config
    media_buckets = dict(media_buckets or {})
    out: dict[str, Any] = {}
    talker = [m for m in micro if m.get("talker_targets") is not None]
    if talker:  # microbatches without codec samples get an empty talker view of the same shape
        rows, talker_len = np.shape(talker[0]["talker_targets"])
        micro = [m if m.get("talker_targets") is not None else {**m, **empty_view(rows, talker_len)} for m in micro]
    for key in TOKEN_KEYS:
        if key.startswith("talker_") and not talker:
            continue
        arrays = [np.asarray(m[key]).astype(_DTYPES[key]) for m in micro]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"microbatches of one step have different {key} shapes {sorted(shapes)}")
        out[key] = np.stack(arrays)  # [k, B, L]
    for key, length_key in zip(POSITION_KEYS, ("input_ids", "talker_targets")):
        if key not in micro[0]:
            continue
        out[key] = np.stack([np.asarray(m[key]).astype(np.int32) for m in micro])  # [k, 3, B, L]
        if out[key].shape[1:] != (3,) + out[length_key].shape[1:]:
            raise ValueError(f"{key} have shape {out[key].shape[1:]}; expected [3, B, L] = "
                             f"{(3,) + out[length_key].shape[1:]}")

    audio = [_audio_chunks(m, cfg) for m in micro]
    out["audio"] = None
    min_chunks = int(media_buckets.get("audio_chunks", 0))
    if any(a is not None for a in audio) or min_chunks:
        window = 2 * cfg.audio.n_window
        count = max([a[0].shape[0] for a in audio if a is not None] + [0])
        if min_chunks and count > min_chunks:
            count = next_power_of_two(count)
        count = max(count, min_chunks)
        chunks = np.zeros((len(micro), count, cfg.audio.num_mel_bins, window), np.float32)
        lengths = np.zeros((len(micro), count), np.int32)
        for i, a in enumerate(audio):
            if a is not None:
                chunks[i, :a[0].shape[0]] = a[0]
                lengths[i, :a[1].shape[0]] = a[1]
        out["audio"] = MultimodalAudio(chunks, lengths, num_tokens=count * (window // 4))

    for name, pixel_key, grid_key, token_id in (
            ("image", "pixel_values", "image_grid_thw", cfg.image_token_index),
            ("video", "pixel_values_videos", "video_grid_thw", cfg.video_token_index)):
        items = [_vision_items(m, cfg, pixel_key, grid_key, token_id, name) for m in micro]
        out[name] = None
        min_patches = int(media_buckets.get(f"{name}_patches", 0))
        if all(it is None for it in items) and not min_patches:
            continue
        merge = cfg.vision.spatial_merge_size
        patch_dim = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
        bucket = max([next_power_of_two(it[0].shape[0], 4 * merge * merge) for it in items if it is not None]
                     + [min_patches])
        pixels, plans = [], []
        for it in items:
            grid = it[1] if it is not None else np.array([[1, merge, merge]])  # stand-in, no placeholders
            plan = plan_vision(grid, cfg.vision, num_patches_bucket=bucket)
            real = it[0] if it is not None else np.zeros((merge * merge, patch_dim), np.float32)
            pixels.append(plan.pad_pixel_values(real))
            plans.append(plan.arrays)
        out[name] = MultimodalVision(np.stack(pixels), jax.tree_util.tree_map(lambda *x: np.stack(x), *plans))
    return out


def split_microbatches(batch: Mapping[str, Any], k: int) -> list[dict]:
    """Split a text-only pipeline batch [B, L] row-wise into k microbatches (tests, benchmarks)."""
    if any(batch.get(key) is not None for key in ("input_features", "pixel_values", "pixel_values_videos")):
        raise ValueError("split_microbatches handles text-only batches; pull k batches from the pipeline instead")
    rows = np.asarray(batch["input_ids"]).shape[0]
    if rows % k:
        raise ValueError(f"{rows} rows do not split into {k} microbatches")
    n = rows // k
    out = []
    for i in range(k):
        m = {key: np.asarray(batch[key])[i * n:(i + 1) * n] for key in TOKEN_KEYS if key in batch}
        for key in POSITION_KEYS:
            if key in batch:
                m[key] = np.asarray(batch[key])[:, i * n:(i + 1) * n]
        out.append(m)
    return out


def batch_shardings(host_batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """NamedShardings for a stacked host batch: token arrays on the batch dim, encoder inputs replicated."""
    everywhere = replicated(mesh)
    out = {key: batch_sharding(mesh, 3, batch_axis=1) for key in TOKEN_KEYS if key in host_batch}
    out.update({key: batch_sharding(mesh, 4, batch_axis=2) for key in POSITION_KEYS if key in host_batch})
    for name in ("audio", "image", "video"):
        out[name] = None if host_batch.get(name) is None else jax.tree_util.tree_map(
            lambda _: everywhere, host_batch[name])
    return out


def to_global(host_batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """Host pytree (this process's rows) -> global jax.Arrays (rows of all processes, in process order).

    Token arrays: each process holds its own slice of the batch dimension. Encoder inputs are replicated, so
    with several processes every process must pass the same values (`device_batch` gathers them).
    """
    shardings = batch_shardings(host_batch, mesh)
    nproc = jax.process_count()
    out = {}
    for key, value in host_batch.items():
        if value is None:
            out[key] = None
        elif key in TOKEN_KEYS or key in POSITION_KEYS:
            axis = 1 if key in TOKEN_KEYS else 2
            shape = list(value.shape)
            shape[axis] *= nproc
            out[key] = jax.make_array_from_process_local_data(shardings[key], value, tuple(shape))
        else:  # replicated encoder inputs: each process fills its own devices (one process: all of them)
            out[key] = jax.tree_util.tree_map(
                lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index, x=x: np.asarray(x)[index]),
                value, shardings[key])
    return out


def device_batch(micro: Sequence[Mapping[str, Any]], thinker_config, mesh: Mesh,
                 media_buckets: Optional[Mapping[str, int]] = None) -> dict:
    """This process's k pipeline batches -> the step's global batch on the mesh.

    With several processes and media on any of them, the pipeline batches of all processes are gathered first
    (train/process_gather.py) so that every process builds the same replicated encoder inputs; each then feeds
    only its own rows of the token arrays."""
    from train import process_gather

    nproc = jax.process_count()
    if nproc > 1 and process_gather.any_process(any(process_gather.has_media(m) for m in micro)):
        everyone = [process_gather.gather_batch(m) for m in micro]
        host = stack_microbatches(everyone, thinker_config, media_buckets)
        host = process_gather.local_rows(host, jax.process_index(), nproc, TOKEN_KEYS, POSITION_KEYS)
    else:
        host = stack_microbatches(micro, thinker_config, media_buckets)
    return to_global(host, mesh)
