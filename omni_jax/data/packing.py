"""Sequence packing into fixed [B, L] batches, as a checkpointable grain IterDataset.

`PackedBatchIterDataset` reads samples (sample.py) in order and places each into the first row of the
current batch with room for all of its tokens (first fit over the B rows; with ``pack=False`` one sample per
row). When a sample fits no row, the
batch is emitted and the sample opens the next one. A sample longer than L is skipped and counted (never
truncated: that could cut a media span); `Skip` markers from processing are counted by reason. With
``max_consecutive_skips``, that many skipped samples in a row (on an endless stream: nothing fits) raise a
ValueError instead of reading forever.

Checkpointing: the iterator state is the parent's state from *before* the sample that is held over for the
next batch, plus the counters, so `set_state(get_state())` re-reads that sample and reproduces the following
batches exactly. States are small dicts of ints (whatever the parent grain iterators hold, plus counters).

Batch (one host's slice; see docs/data.md):
  input_ids [B, L] int32 (pad 151643), targets [B, L] int32, loss_mask [B, L] float32,
  segment_ids [B, L] int32 (1, 2, ... per sample, 0 = padding), positions [3, B, L] int32,
  num_samples [] int32, num_tokens [] int32 (sum of loss_mask), and per modality present in the batch, the
  media of all samples concatenated row-major (row 0 segment 1, row 0 segment 2, ..., row 1, ...):
  input_features [A, 128, F] float32 + feature_attention_mask [A, F] int32 (F = longest clip rounded up to
  `frame_bucket`), pixel_values [P, 1176] + image_grid_thw [I, 3] int64, pixel_values_videos [Pv, 1176] +
  video_grid_thw [V, 3] int64 + video_second_per_grid [V] float32.
  With a `TalkerLayout` (talker_view.py) and samples that carry codec targets (omni_toy): the talker view of
  the rows, talker_* [B, Lt] + talker_positions [3, B, Lt] (talker_view.py). A sample fits a row only when
  its thinker tokens fit L and its talker tokens fit Lt; a batch without any codec sample has no talker keys.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import grain
import numpy as np

from omni_jax.data.sample import Skip
from omni_jax.data.talker_view import TalkerLayout, collate_talker, talker_length
from omni_jax.processing.audio import DEFAULT_FRAME_BUCKET
from omni_jax.processing.tokenizer import ENDOFTEXT_ID

log = logging.getLogger(__name__)

COUNTER_NAMES = ("samples_read", "samples_packed", "skipped_bad_media", "skipped_bad_conversation",
                 "skipped_no_loss_tokens", "skipped_too_long", "batches", "real_tokens", "loss_tokens")


def collate(rows: list[list[dict]], seq_len: int, pad_id: int = ENDOFTEXT_ID,
            frame_bucket: int = DEFAULT_FRAME_BUCKET, talker: Optional[TalkerLayout] = None) -> dict[str, np.ndarray]:
    """Packed rows of samples -> one batch dict (see the module docstring; talker keys need `talker`)."""
    B, L = len(rows), seq_len
    input_ids = np.full((B, L), pad_id, np.int32)
    targets = np.zeros((B, L), np.int32)
    loss_mask = np.zeros((B, L), np.float32)
    segment_ids = np.zeros((B, L), np.int32)
    positions = np.zeros((3, B, L), np.int32)
    media: dict[str, list] = {k: [] for k in ("audio", "pixel_values", "image_grid_thw", "pixel_values_videos",
                                              "video_grid_thw", "video_second_per_grid")}
    for b, row in enumerate(rows):
        offset = 0
        for seg, s in enumerate(row, start=1):
            ids = s["input_ids"]
            n = len(ids)
            sl = slice(offset, offset + n)
            input_ids[b, sl] = ids
            targets[b, offset:offset + n - 1] = ids[1:]
            loss_mask[b, offset:offset + n - 1] = s["assistant_mask"][1:]
            segment_ids[b, sl] = seg
            positions[:, b, sl] = s["positions"]
            offset += n
            media["audio"] += s["audio_features"]
            for key in media:
                if key != "audio" and key in s:
                    media[key].append(s[key])
    batch = {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
             "positions": positions, "num_samples": np.int32(sum(len(r) for r in rows)),
             "num_tokens": np.int32(loss_mask.sum())}
    if talker is not None and any(talker_length(s) for row in rows for s in row):
        batch.update(collate_talker(rows, talker))
    if media["audio"]:
        clips = media["audio"]
        longest = max(c.shape[1] for c in clips)
        frames = -(-longest // frame_bucket) * frame_bucket
        features = np.zeros((len(clips), clips[0].shape[0], frames), np.float32)
        mask = np.zeros((len(clips), frames), np.int32)
        for k, c in enumerate(clips):
            features[k, :, :c.shape[1]] = c
            mask[k, :c.shape[1]] = 1
        batch["input_features"], batch["feature_attention_mask"] = features, mask
    if media["pixel_values"]:
        batch["pixel_values"] = np.concatenate(media["pixel_values"]).astype(np.float32)
        batch["image_grid_thw"] = np.concatenate(media["image_grid_thw"]).astype(np.int64)
    if media["pixel_values_videos"]:
        batch["pixel_values_videos"] = np.concatenate(media["pixel_values_videos"]).astype(np.float32)
        batch["video_grid_thw"] = np.concatenate(media["video_grid_thw"]).astype(np.int64)
        batch["video_second_per_grid"] = np.concatenate(media["video_second_per_grid"]).astype(np.float32)
    return batch


class _PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, batch_size: int, pack: bool, pad_id: int,
                 frame_bucket: int, max_consecutive_skips: Optional[int], talker: Optional[TalkerLayout] = None):
        super().__init__(parent)
        self._talker = talker
        self._max_skips = max_consecutive_skips
        self._warned_too_long: set[str] = set()
        self._seq_len, self._batch_size, self._pack = seq_len, batch_size, pack
        self._pad_id, self._frame_bucket = pad_id, frame_bucket
        self._pending: dict | None = None  # a sample read but not yet placed (opens the next batch)
        self._pending_state: dict | None = None  # parent state from before reading it
        self._exhausted = False
        self.counters = {name: 0 for name in COUNTER_NAMES}
        self.last_batch_ids: list[list[str]] = []  # sample ids per row of the last batch (logs, tests)

    def _talker_length(self, sample: dict) -> int:
        return talker_length(sample) if self._talker is not None else 0

    def _count_skip(self, skip: Skip) -> None:
        self.counters[f"skipped_{skip.reason}"] += 1

    def __next__(self) -> dict[str, np.ndarray]:
        L, B = self._seq_len, self._batch_size
        rows: list[list[dict]] = [[] for _ in range(B)]
        fill = [0] * B
        talker_fill = [0] * B  # talker tokens per row (with a TalkerLayout)
        Lt = self._talker.seq_len if self._talker is not None else 0
        if self._pending is not None:
            rows[0].append(self._pending)
            fill[0] = len(self._pending["input_ids"])
            talker_fill[0] = self._talker_length(self._pending)
            self.counters["samples_read"] += 1
            self._pending = self._pending_state = None
        skips = 0
        while not self._exhausted:
            if self._max_skips is not None and skips > self._max_skips:
                raise ValueError(f"{skips} samples in a row were skipped (none fits seq_len={L} or none can be "
                                 f"processed); counters: {self.counters}")
            state_before = self._parent.get_state()
            try:
                sample = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            self.counters["samples_read"] += 1
            if isinstance(sample, Skip):
                self._count_skip(sample)
                skips += 1
                continue
            n = len(sample["input_ids"])
            nt = self._talker_length(sample)
            if n > L or nt > Lt:
                self.counters["skipped_too_long"] += 1
                skips += 1
                if sample["id"] not in self._warned_too_long:  # once per sample, not once per epoch
                    self._warned_too_long.add(sample["id"])
                    log.warning("skipping %s (too_long): %d tokens > seq_len %d or %d talker tokens > talker "
                                "seq_len %d", sample["id"], n, L, nt, Lt)
                continue
            skips = 0
            row = next((b for b in range(B) if fill[b] + n <= L and talker_fill[b] + nt <= Lt
                        and (self._pack or not rows[b])), None)
            if row is None:  # the batch is full for this sample: it opens the next batch
                self.counters["samples_read"] -= 1  # re-read after a restore; counted when placed
                self._pending, self._pending_state = sample, state_before
                break
            rows[row].append(sample)
            fill[row] += n
            talker_fill[row] += nt
        if not any(rows):
            raise StopIteration
        batch = collate(rows, L, self._pad_id, self._frame_bucket, self._talker)
        self.last_batch_ids = [[s["id"] for s in row] for row in rows]
        placed = int(batch["num_samples"])
        self.counters["samples_packed"] += placed
        self.counters["batches"] += 1
        self.counters["real_tokens"] += int(sum(fill))
        self.counters["loss_tokens"] += int(batch["num_tokens"])
        return batch

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        # A held-over sample was read but is not counted yet (it is re-read after set_state).
        return {"parent": parent, "counters": dict(self.counters)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self._exhausted = False
        self.counters = {name: int(state["counters"].get(name, 0)) for name in COUNTER_NAMES}


class PackedBatchIterDataset(grain.IterDataset):
    """Samples (or Skip markers) -> packed [batch_size, seq_len] batches (module docstring)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, batch_size: int, pack: bool = True,
                 pad_id: int = ENDOFTEXT_ID, frame_bucket: int = DEFAULT_FRAME_BUCKET,
                 max_consecutive_skips: Optional[int] = None, talker: Optional[TalkerLayout] = None):
        super().__init__(parent)
        self._max_skips = max_consecutive_skips
        self._talker = talker
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        self._seq_len, self._batch_size, self._pack = seq_len, batch_size, pack
        self._pad_id, self._frame_bucket = pad_id, frame_bucket

    def __iter__(self) -> _PackedBatchIterator:
        return _PackedBatchIterator(self._parent.__iter__(), self._seq_len, self._batch_size, self._pack,
                                    self._pad_id, self._frame_bucket, self._max_skips, self._talker)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset(seq_len={self._seq_len}, batch_size={self._batch_size})"
