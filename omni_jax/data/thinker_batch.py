"""A packed training batch (packing.py) -> the Thinker's inputs, host side.

`prepare_thinker_inputs` (model_inputs.py) serves processor batches: it computes positions with one
`rope_index` call per row and one `use_audio_in_video` flag for the batch. A packed batch already carries
per-sample positions (restarting in every segment, each sample with its own `use_audio_in_video`), so here
only the encoder inputs are built, by the same `model_inputs.encoder_inputs` (same buckets, same
placeholder-count checks).

    ids, positions, segment_ids, multimodal = packed_thinker_inputs(batch, thinker_config)
    thinker.apply({"params": p}, ids, positions, segment_ids, **multimodal)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from omni_jax.model_inputs import encoder_inputs


def packed_thinker_inputs(batch: Mapping[str, Any], config) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(input_ids [B, L] int32, positions [3, B, L] int32, segment_ids [B, L] int32, multimodal) where
    multimodal = {"audio": MultimodalAudio | None, "image": ..., "video": ...} (numpy leaves)."""
    ids = np.asarray(batch["input_ids"], np.int32)
    audio, image, video, _ = encoder_inputs(batch, ids, config)
    multimodal = {"audio": audio, "image": image, "video": video}
    return ids, np.asarray(batch["positions"], np.int32), np.asarray(batch["segment_ids"], np.int32), multimodal
