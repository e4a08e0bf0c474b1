"""A packed training batch (packing.py) -> the Thinker's inputs, host side.

`prepare_thinker_inputs` (model_inputs.py) serves processor batches: it computes positions with one
`rope_index` call per row and one `use_audio_in_video` flag for the batch. A packed batch already carries
per-sample positions (restarting in every segment, each sample with its own `use_audio_in_video`), so here
only the encoder plans are built, with the same buckets (audio chunks to a multiple of 8, vision patches to a
power of two) and the same placeholder-count checks.

    ids, positions, segment_ids, multimodal = packed_thinker_inputs(batch, thinker_config)
    thinker.apply({"params": p}, ids, positions, segment_ids, **multimodal)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from omni_jax.model_inputs import AUDIO_CHUNK_BUCKET, next_power_of_two
from omni_jax.models.audio_encoder import plan_audio_chunks
from omni_jax.models.thinker import MultimodalAudio, MultimodalVision
from omni_jax.models.vision_encoder import plan_vision


def _vision(pixel_values, grid_thw, config, what: str, placeholders: int) -> MultimodalVision:
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    merge2 = config.vision.spatial_merge_size ** 2
    patches = int(np.prod(grid, axis=1).sum())
    if pixel_values.shape[0] != patches:
        raise ValueError(f"{what}: {pixel_values.shape[0]} patches but the grids {grid.tolist()} need {patches}")
    plan = plan_vision(grid, config.vision, num_patches_bucket=next_power_of_two(patches, 4 * merge2))
    if placeholders != plan.num_tokens:
        raise ValueError(f"packed batch: {placeholders} {what} placeholder tokens but the {what} grids give "
                         f"{plan.num_tokens} features")
    return MultimodalVision(plan.pad_pixel_values(np.asarray(pixel_values, np.float32)), plan.arrays)


def packed_thinker_inputs(batch: Mapping[str, Any], config) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(input_ids [B, L] int32, positions [3, B, L] int32, segment_ids [B, L] int32, multimodal) where
    multimodal = {"audio": MultimodalAudio | None, "image": ..., "video": ...} (numpy leaves)."""
    ids = np.asarray(batch["input_ids"], np.int32)
    multimodal: dict[str, Any] = {"audio": None, "image": None, "video": None}
    n_audio = int((ids == config.audio_token_index).sum())
    if "input_features" in batch:
        plan = plan_audio_chunks(batch["input_features"], batch["feature_attention_mask"],
                                 chunk_bucket=AUDIO_CHUNK_BUCKET, n_window=config.audio.n_window)
        if n_audio != plan.num_tokens:
            raise ValueError(f"packed batch: {n_audio} audio placeholder tokens but the audio gives "
                             f"{plan.num_tokens} (per clip: {plan.tokens_per_sample.tolist()})")
        window = plan.chunks.shape[-1]
        multimodal["audio"] = MultimodalAudio(plan.chunks, plan.chunk_lengths,
                                              num_tokens=plan.num_chunks * (window // 4))
    elif n_audio:
        raise ValueError("packed batch has audio placeholder tokens but no input_features")
    for kind, key, grid_key, token in (("image", "pixel_values", "image_grid_thw", config.image_token_index),
                                       ("video", "pixel_values_videos", "video_grid_thw", config.video_token_index)):
        count = int((ids == token).sum())
        if key in batch:
            multimodal[kind] = _vision(np.asarray(batch[key]), batch[grid_key], config, kind, count)
        elif count:
            raise ValueError(f"packed batch has {kind} placeholder tokens but no {key}")
    return ids, np.asarray(batch["positions"], np.int32), np.asarray(batch["segment_ids"], np.int32), multimodal
