"""One stored record -> one training sample: tokens, assistant mask, TMRoPE positions and media features.

The Processor does the work (chat template as the Qwen2.5-Omni release, placeholder expansion, audio mel,
image / video patches); the stored media bytes are written to a scratch folder (/dev/shm when present) for
its file loaders and removed right after.

A sample (a dict of numpy arrays, one conversation, no padding):
  id                      str
  input_ids               [n] int32
  assistant_mask          [n] bool: the token is part of an assistant reply (reply text + its <|im_end|>;
                          the "<|im_start|>assistant\\n" header and media placeholders are not)
  positions               [3, n] int32 TMRoPE positions of this conversation alone (rope_index)
  audio_features          list of [128, F_i] float32: each audio clip's valid mel frames, placeholder order
                          (video audio tracks included with use_audio_in_video)
  pixel_values [P, 1176], image_grid_thw [I, 3]                            (present when it has images)
  pixel_values_videos [Pv, 1176], video_grid_thw [V, 3], video_second_per_grid [V]   (videos)
  codec                   [c] int32 codec targets (toy task; may be empty)
  answer                  str reference answer (toy task; "" otherwise)

A record that cannot be processed becomes a `Skip` (reason + message naming the record), counted downstream.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.data import records
from omni_jax.processing.media import MediaError
from omni_jax.processing.processor import Processor
from omni_jax.processing.tmrope import RopeTokenIds, rope_index
from omni_jax.processing.tokenizer import (
    AUDIO_BOS_ID,
    AUDIO_TOKEN_ID,
    IM_END_ID,
    IM_START_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_BOS_ID,
)

log = logging.getLogger(__name__)

PLACEHOLDER_IDS = (AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record that was not turned into a sample."""

    reason: str  # "bad_media" | "bad_conversation" | "no_loss_tokens" | "too_long" (set by the packer)
    sample_id: str
    message: str


def rope_ids_for(processor: Processor) -> RopeTokenIds:
    """The token ids and sizes `rope_index` needs, from the processor (Qwen2.5-Omni token ids)."""
    return RopeTokenIds(image=IMAGE_TOKEN_ID, video=VIDEO_TOKEN_ID, audio=AUDIO_TOKEN_ID,
                        vision_start=VISION_BOS_ID, audio_start=AUDIO_BOS_ID,
                        spatial_merge_size=int(processor.image_config.merge_size),
                        position_id_per_seconds=processor.position_id_per_seconds,
                        seconds_per_chunk=processor.seconds_per_chunk)


def _roles(conversation: Sequence[Mapping[str, Any]]) -> list[str]:
    """Role of each <|im_start|> block, in order (the template inserts a system message first if needed)."""
    roles = [m["role"] for m in conversation]
    return roles if roles and roles[0] == "system" else ["system"] + roles


def assistant_mask(ids: np.ndarray, conversation: Sequence[Mapping[str, Any]], processor: Processor) -> np.ndarray:
    """[n] bool: tokens of assistant replies, from after the header's newline token through <|im_end|>.

    A reply's leading newline that the tokenizer merges into the header's newline token (e.g. "\\n\\n") is
    part of the header."""
    roles = _roles(conversation)
    starts = np.flatnonzero(ids == IM_START_ID)
    if len(starts) != len(roles):
        raise ValueError(f"{len(starts)} <|im_start|> tokens for {len(roles)} messages (an <|im_start|> in a text?)")
    mask = np.zeros(ids.shape, bool)
    ends = np.flatnonzero(ids == IM_END_ID)
    for start, role in zip(starts, roles):
        end = ends[ends > start]
        if not len(end):
            raise ValueError(f"message starting at token {start} has no <|im_end|>")
        end = int(end[0])
        if role != "assistant":
            continue
        body = start + 1
        while body < end and "\n" not in processor.tokenizer.decode([int(ids[body])], skip_special_tokens=False):
            body += 1
        mask[body + 1:end + 1] = True  # the reply and its <|im_end|>
    mask &= ~np.isin(ids, PLACEHOLDER_IDS)
    return mask


def process_record(record: Mapping[str, Any], processor: Processor, rope_ids: RopeTokenIds) -> dict | Skip:
    """A raw record from the data source -> a sample dict (see the module docstring) or a Skip."""
    rec = records.decode_record(record)
    sample_id = rec["id"]
    use_aiv = rec["use_audio_in_video"]
    try:
        with tempfile.TemporaryDirectory(prefix="omni_media_", dir=records.scratch_dir()) as tmp:
            paths = records.write_media(rec["media"], tmp)
            conversation = records.resolve_media(rec["conversation"], lambda k, part, kind: paths[k])
            batch = processor([conversation], use_audio_in_video=use_aiv, add_generation_prompt=False)
    except MediaError as err:
        log.warning("skipping %s (bad_media): %s", sample_id, err)
        return Skip("bad_media", sample_id, str(err))
    except (ValueError, KeyError, IndexError) as err:
        log.warning("skipping %s (bad_conversation): %s", sample_id, err)
        return Skip("bad_conversation", sample_id, str(err))

    ids = batch["input_ids"][0].astype(np.int32)  # one row: no padding
    try:
        mask = assistant_mask(ids, rec["conversation"], processor)
    except ValueError as err:
        return Skip("bad_conversation", sample_id, str(err))
    if not mask[1:].any():
        return Skip("no_loss_tokens", sample_id, "no assistant token to learn")

    sample: dict[str, Any] = {"id": sample_id, "input_ids": ids, "assistant_mask": mask, "codec": rec["codec"],
                              "answer": rec["answer"]}
    audio_seqlens = None
    sample["audio_features"] = []
    if "input_features" in batch:
        lengths = batch["feature_attention_mask"].sum(-1).astype(np.int64)
        sample["audio_features"] = [batch["input_features"][k, :, :n] for k, n in enumerate(lengths)]
        audio_seqlens = lengths
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        if key in batch:
            sample[key] = batch[key]
    positions, _ = rope_index(ids[None], None, image_grid_thw=batch.get("image_grid_thw"),
                              video_grid_thw=batch.get("video_grid_thw"), audio_seqlens=audio_seqlens,
                              video_second_per_grid=batch.get("video_second_per_grid"),
                              use_audio_in_video=use_aiv, config=rope_ids)
    sample["positions"] = positions[:, 0].astype(np.int32)  # [3, n]
    return sample
