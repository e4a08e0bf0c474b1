"""`synthetic_count`: a text-only packed dataset on grain, for fast tests and benchmarks of the train loop.

Each sample counts upwards from a random start: tokens (start, start+1, ...) mod `span`, offset by `base`;
the model can learn to predict the next token exactly. Rows of length L are packed with whole samples of
random length (segment ids 1, 2, ...; positions restart per segment, all three TMRoPE axes equal as for
text), padding at the end. Batches follow the pipeline contract (docs/data.md), so the loop treats this
source like the real one, iterator state (grain) included.
"""
from __future__ import annotations

import numpy as np

PAD_ID = 151643


def make_row(index: int, seed: int, seq_len: int, base: int = 1000, span: int = 64,
             min_len: int = 6, max_len: int = 24) -> dict:
    """Packed row number `index` (deterministic in (seed, index))."""
    rng = np.random.default_rng([seed, index])
    ids = np.full((seq_len,), PAD_ID, np.int32)
    targets = np.zeros((seq_len,), np.int32)
    mask = np.zeros((seq_len,), np.float32)
    segments = np.zeros((seq_len,), np.int32)
    positions = np.zeros((seq_len,), np.int32)
    at, segment = 0, 0
    while seq_len - at >= min_len:
        length = int(rng.integers(min_len, min(max_len, seq_len - at) + 1))
        start = int(rng.integers(0, span))
        tokens = base + (start + np.arange(length)) % span
        segment += 1
        ids[at:at + length] = tokens
        targets[at:at + length - 1] = tokens[1:]
        mask[at + 1:at + length - 1] = 1.0  # the first prediction (of token 2 from token 1) is a guess: skip it
        segments[at:at + length] = segment
        positions[at:at + length] = np.arange(length)
        at += length
    return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": segments,
            "positions": np.broadcast_to(positions, (3, seq_len)).copy()}


def _collate(rows: list) -> dict:
    batch = {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "targets", "loss_mask", "segment_ids")}
    batch["positions"] = np.stack([r["positions"] for r in rows], axis=1)  # [3, B, L]
    batch["num_samples"] = np.int32(batch["segment_ids"].max(axis=1).sum())
    batch["num_tokens"] = np.int32(batch["loss_mask"].sum())
    return batch


def make_train_iterator(*, seq_len: int, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                        num_rows: int = 4096, split: str = "train", nan_from_batch: int = -1):
    """A grain DatasetIterator (get_state / set_state) over this host's rows, repeated forever.

    The global order is one shuffled sequence of rows; host h takes rows h, h + shard_count, ... of it, so
    batch b of host h holds global rows that a single process with batch_size * shard_count would see in its
    batch b, in host-major order.

    nan_from_batch >= 0 puts NaN in the loss mask of every batch from that one on (tests of the loop's
    non-finite handling).
    """
    import grain

    offset = 0 if split == "train" else 1_000_000  # disjoint rows for eval
    # host h, local row r of batch b <- global row b * (B * H) + h * B + r
    global_batch = batch_size * shard_count
    ds = grain.MapDataset.range(1 << 40).map(
        lambda i: (i // batch_size) * global_batch + shard_index * batch_size + i % batch_size)
    rows = grain.MapDataset.range(num_rows).shuffle(seed=seed).repeat(None)
    ds = ds.map(lambda i: make_row(int(rows[int(i)]) + offset, seed, seq_len))
    ds = ds.batch(batch_size, batch_fn=_collate)
    if nan_from_batch >= 0:
        ds = ds.map_with_index(lambda i, b: b if i < nan_from_batch else dict(
            b, loss_mask=np.where(b["loss_mask"] > 0, np.nan, 0).astype(np.float32)))
    return iter(ds.to_iter_dataset())
