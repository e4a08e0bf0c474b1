"""Host side: turn a processor batch (numpy, HF key names) into the thinker's device inputs.

Computes TMRoPE positions, the audio chunk plan and the vision window plans, pads shapes into buckets so the
number of compiled programs stays small, and checks that placeholder tokens and features agree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import ThinkerConfig
from omni_jax.models.audio_encoder import plan_audio_chunks
from omni_jax.models.thinker import MultimodalAudio, MultimodalVision
from omni_jax.models.vision_encoder import plan_vision
from omni_jax.processing.tmrope import rope_index

AUDIO_CHUNK_BUCKET = 8  # audio chunks (2 s each) are padded to a multiple of 8


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class ThinkerInputs:
    input_ids: np.ndarray  # [B, T] int32
    attention_mask: np.ndarray  # [B, T] int32
    positions: np.ndarray  # [3, B, T] int32 TMRoPE positions
    rope_deltas: np.ndarray  # [B] int64
    audio: Optional[MultimodalAudio] = None  # numpy leaves
    image: Optional[MultimodalVision] = None
    video: Optional[MultimodalVision] = None
    rope_kwargs: dict = dataclasses.field(default_factory=dict)  # grids etc. for rope_index (reused by the talker)

    @property
    def next_positions(self) -> np.ndarray:
        """RoPE position of the first generated token per row: (real tokens) + rope delta. [B] int32."""
        return (self.attention_mask.sum(-1) + self.rope_deltas).astype(np.int32)

    def multimodal(self) -> dict[str, Any]:
        """The encoder inputs as jnp pytrees (keys audio/image/video; absent modalities are None)."""
        def to_device(x):
            return None if x is None else jax.tree_util.tree_map(jnp.asarray, x)

        return {"audio": to_device(self.audio), "image": to_device(self.image), "video": to_device(self.video)}


def _count(ids: np.ndarray, token_id: int) -> int:
    return int((ids == token_id).sum())


def _vision(pixel_values, grid_thw, cfg, what: str, ids: np.ndarray, token_id: int) -> MultimodalVision:
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values, np.float32)
    expected_patches = int(np.prod(grid, axis=1).sum())
    if pixel_values.shape[0] != expected_patches:
        raise ValueError(f"{what}: pixel values have {pixel_values.shape[0]} patches but the grids {grid.tolist()} "
                         f"need {expected_patches}")
    merge2 = cfg.vision.spatial_merge_size ** 2
    plan = plan_vision(grid, cfg.vision, num_patches_bucket=next_power_of_two(expected_patches, 4 * merge2))
    placeholders = _count(ids, token_id)
    if placeholders != plan.num_tokens:
        raise ValueError(f"mismatch between {what} placeholder tokens and features: the prompt has {placeholders} "
                         f"placeholder tokens but the {what} grids {grid.tolist()} give {plan.num_tokens} features")
    return MultimodalVision(plan.pad_pixel_values(pixel_values), plan.arrays)


def encoder_inputs(batch: Mapping[str, Any], ids: np.ndarray, config: ThinkerConfig):
    """The encoders' inputs of a batch, checked against the placeholder tokens in `ids` [B, T]:
    (audio: MultimodalAudio | None, image, video: MultimodalVision | None, audio_seqlens [A] | None)."""
    audio = image = video = None
    audio_seqlens = None
    if batch.get("input_features") is not None:
        if batch.get("feature_attention_mask") is None:
            raise ValueError("input_features given without feature_attention_mask (needed for the audio lengths)")
        features = np.asarray(batch["input_features"], np.float32)
        feature_mask = np.asarray(batch["feature_attention_mask"])
        plan = plan_audio_chunks(features, feature_mask, chunk_bucket=AUDIO_CHUNK_BUCKET, n_window=config.audio.n_window)
        audio_seqlens = feature_mask.sum(-1).astype(np.int64)
        placeholders = _count(ids, config.audio_token_index)
        if placeholders != plan.num_tokens:
            raise ValueError(f"mismatch between audio placeholder tokens and features: the prompt has "
                             f"{placeholders} audio placeholder tokens but the audio gives {plan.num_tokens} "
                             f"(per clip: {plan.tokens_per_sample.tolist()})")
        window = plan.chunks.shape[-1]
        audio = MultimodalAudio(plan.chunks, plan.chunk_lengths, num_tokens=plan.num_chunks * (window // 4))
    elif _count(ids, config.audio_token_index):
        raise ValueError("the prompt has audio placeholder tokens but the batch has no input_features")

    if batch.get("pixel_values") is not None:
        image = _vision(batch["pixel_values"], batch["image_grid_thw"], config, "image", ids, config.image_token_index)
    elif _count(ids, config.image_token_index):
        raise ValueError("the prompt has image placeholder tokens but the batch has no pixel_values")
    if batch.get("pixel_values_videos") is not None:
        video = _vision(batch["pixel_values_videos"], batch["video_grid_thw"], config, "video", ids,
                        config.video_token_index)
    elif _count(ids, config.video_token_index):
        raise ValueError("the prompt has video placeholder tokens but the batch has no pixel_values_videos")

    return audio, image, video, audio_seqlens


def prepare_thinker_inputs(batch: Mapping[str, Any], config: ThinkerConfig, use_audio_in_video: bool = False,
                           pad_to: Optional[int] = None, pad_id: int = 151643) -> ThinkerInputs:
    """Processor batch -> ThinkerInputs. `pad_to` left-pads the text to that length (generation buckets)."""
    if "input_ids" not in batch:
        raise KeyError("batch has no 'input_ids'")
    ids = np.asarray(batch["input_ids"]).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
    if pad_to is not None and pad_to > ids.shape[1]:
        extra = pad_to - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)), constant_values=0)
    max_positions = config.text.max_position_embeddings
    if ids.shape[1] > max_positions:
        raise ValueError(f"prompt of {ids.shape[1]} tokens is longer than the context of {max_positions} positions")

    audio, image, video, audio_seqlens = encoder_inputs(batch, ids, config)

    rope_kwargs = dict(
        image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
        audio_seqlens=audio_seqlens, video_second_per_grid=batch.get("video_second_per_grid"),
        use_audio_in_video=use_audio_in_video,
    )
    positions, deltas = rope_index(ids, mask, config=config, **rope_kwargs)
    return ThinkerInputs(ids, mask, positions.astype(np.int32), np.asarray(deltas), audio, image, video, rope_kwargs)
