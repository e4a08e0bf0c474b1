"""The grain input pipeline: TFDS array_record records -> processed samples -> packed fixed-shape batches.

    it = make_train_iterator(data_config, processor=processor, seq_len=512, batch_size=8, seed=0,
                             shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it)                          # dict of numpy arrays (packing.py / docs/data.md)
    state = it.get_state(); it.set_state(state)   # checkpointable (small dict of ints)
    it.counters                               # samples read / packed / skipped by reason, tokens

Order of operations (all deterministic given the seed):
  source (array_record, random access) -> [shard_index::shard_count] (disjoint shards covering the set)
  -> shuffle(seed) (a fresh permutation per epoch: grain folds the epoch into the seed) -> repeat(num_epochs)
  -> map(process_record) in `num_threads` threads, order kept -> PackedBatchIterDataset(seq_len, batch_size)

Hosts' shards differ in length by at most one record; with packing, hosts may produce a different number of
batches per epoch, so multi-host runs should train on the infinite stream (num_epochs=None) and count steps.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Mapping
from typing import Any, Optional

import grain
import numpy as np

from omni_jax.data import records
from omni_jax.data.packing import PackedBatchIterDataset
from omni_jax.data.sample import process_record, rope_ids_for
from omni_jax.data.talker_view import TalkerLayout
from omni_jax.processing.media import load_audio, load_image, load_video
from omni_jax.processing.processor import Processor
from omni_jax.processing.video import VideoProcessorConfig

DATASETS = ("omni_toy", "conversation_jsonl")


@dataclasses.dataclass
class DataConfig:
    """The `data:` section of a train YAML.

    dataset: "omni_toy" or "conversation_jsonl".
    data_dir: TFDS data_dir (built datasets live in data_dir/<dataset>/<config>/<version>).
    config: builder config: omni_toy "default" (2000/200) or "small" (16/8), or a custom size through
      toy_num_train / toy_num_validation; conversation_jsonl: any name for this dataset.
    jsonl: {split: path} (or one path for "train") of the conversation JSONL, needed to build it.
    split: split to train on.  packing: pack several samples per row (else one per row).
    shuffle / shuffle_seed: shuffle the records (shuffle_seed overrides the seed given to the iterator).
    use_audio_in_video: default for JSONL lines without the key.
    build: build the dataset when it is not in data_dir yet (under a file lock, so hosts can share data_dir).
    num_threads / prefetch: grain ReadOptions for the processing map.
    cache_samples: keep every processed sample in memory, keyed by record id (processing is deterministic,
      so batches are unchanged; after the first epoch only packing runs). For small sets such as omni_toy
      (~100 KB per toy sample, ~200 MB for the default 2000).
    """

    dataset: str = "omni_toy"
    data_dir: str = "~/tensorflow_datasets"
    config: str = "default"
    jsonl: Any = None
    split: str = "train"
    packing: bool = True
    shuffle: bool = True
    shuffle_seed: Optional[int] = None
    use_audio_in_video: bool = False
    build: bool = True
    num_threads: int = 2
    prefetch: int = 16
    cache_samples: bool = False
    toy_num_train: Optional[int] = None
    toy_num_validation: Optional[int] = None
    toy_seed: int = 0

    @classmethod
    def from_any(cls, config: Any) -> "DataConfig":
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            config = vars(config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known: {sorted(names)}")
        out = cls(**dict(config))
        if out.dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {out.dataset!r}")
        return out


def get_builder(config: Any):
    """The TFDS builder for a data config (not built yet, necessarily)."""
    cfg = DataConfig.from_any(config)
    data_dir = os.path.expanduser(cfg.data_dir)
    if cfg.dataset == "omni_toy":
        from omni_jax.data.toy_builder import OmniToy, OmniToyConfig

        builder_config: Any = cfg.config
        if cfg.toy_num_train is not None or cfg.toy_num_validation is not None:
            n_train = cfg.toy_num_train if cfg.toy_num_train is not None else 2000
            n_val = cfg.toy_num_validation if cfg.toy_num_validation is not None else 200
            builder_config = OmniToyConfig(name=f"n{n_train}_v{n_val}_s{cfg.toy_seed}", num_train=n_train,
                                           num_validation=n_val, seed=cfg.toy_seed)
        return OmniToy(data_dir=data_dir, config=builder_config)
    from omni_jax.data.conversation_builder import ConversationJsonl

    splits = cfg.jsonl
    if isinstance(splits, (str, os.PathLike)):
        splits = {"train": os.fspath(splits)}
    return ConversationJsonl(data_dir=data_dir, config=cfg.config, splits=splits,
                             use_audio_in_video=cfg.use_audio_in_video)


def build_dataset(config: Any):
    """Build the dataset if it is not built yet (file-locked, so concurrent hosts build it once); the builder."""
    cfg = DataConfig.from_any(config)
    builder = get_builder(cfg)
    if builder.is_prepared():
        return builder
    if not cfg.build:
        raise FileNotFoundError(f"dataset {cfg.dataset}/{cfg.config} is not built in {cfg.data_dir} "
                                "(set data.build: true or build it first)")
    data_dir = os.path.expanduser(cfg.data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{cfg.dataset}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            builder = get_builder(cfg)  # another host may have finished it meanwhile
            if not builder.is_prepared():
                builder.download_and_prepare()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return get_builder(cfg)


def load_source(config: Any, split: str):
    """The random-access array_record data source of a split (built first when needed)."""
    builder = build_dataset(config)
    sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"split {split!r} not in dataset {builder.name} (splits: {sorted(sources)})")
    return sources[split]


class _ProcessRecord:
    """The map function: record -> sample (sample.process_record), optionally memoized by record id."""

    def __init__(self, processor: Processor, cache: bool):
        self._processor = processor
        self._rope_ids = rope_ids_for(processor)
        self._cache: Optional[dict] = {} if cache else None

    def __call__(self, record):
        if self._cache is None:
            return process_record(record, self._processor, self._rope_ids)
        key = bytes(record["id"])
        sample = self._cache.get(key)
        if sample is None:
            sample = self._cache[key] = process_record(record, self._processor, self._rope_ids)
        return sample


def make_dataset(data_config: Any, *, processor: Processor, seq_len: int, batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, num_epochs: Optional[int] = None,
                 split: Optional[str] = None, talker: Optional[TalkerLayout] = None) -> PackedBatchIterDataset:
    """The grain IterDataset of packed batches (module docstring); `make_train_iterator` iterates it.

    talker: lay out the talker view of every row (talker_view.py) for samples with codec targets; its ids
    come from the model config (`TalkerLayout.from_config`), its row length from data.talker_seq_len."""
    cfg = DataConfig.from_any(data_config)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
    source = load_source(cfg, split or cfg.split)
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} of {len(source)} records is empty")
    shard_size = len(ds)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.shuffle_seed if cfg.shuffle_seed is not None else seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(_ProcessRecord(processor, cfg.cache_samples))
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    # More skips in a row than one pass over the shard: nothing in it can be used.
    return PackedBatchIterDataset(ds.to_iter_dataset(read), seq_len, batch_size, pack=cfg.packing,
                                  pad_id=processor.pad_token_id, frame_bucket=processor.audio_pad_to_multiple_of,
                                  max_consecutive_skips=shard_size + 1, talker=talker)


def make_train_iterator(data_config: Any, *, processor: Processor, seq_len: int, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1, num_epochs: Optional[int] = None,
                        talker: Optional[TalkerLayout] = None):
    """A checkpointable iterator (grain DatasetIterator: get_state / set_state, `.counters`) of packed
    [batch_size, seq_len] batches of this host's shard (see docs/data.md for the batch contract); with
    `talker`, batches of samples with codec targets carry the talker view (talker_view.py)."""
    return iter(make_dataset(data_config, processor=processor, seq_len=seq_len, batch_size=batch_size, seed=seed,
                             shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                             talker=talker))


# ------------------------------------------------------------------------------------------------ eval
def _inline_media(rec: dict, folder: str) -> list:
    """The record's conversation with media decoded in memory (PIL images, 16 kHz waveforms, sampled video
    frames + audio track), so the prompt needs no files; the Processor gives the same features as from files."""
    paths = records.write_media(rec["media"], folder)

    def resolve(k, part, kind):
        if kind == "image":
            return load_image(paths[k])
        if kind == "audio":
            return load_audio(paths[k])
        keys = ("min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames")
        vcfg = dataclasses.replace(VideoProcessorConfig(), **{x: int(part[x]) for x in keys if x in part})
        video = load_video(paths[k], vcfg, fps=part.get("fps"), load_audio_track=rec["use_audio_in_video"])
        part["fps"] = video.fps
        if video.audio is not None:
            part["audio_track"] = video.audio
        return video.frames

    return records.resolve_media(rec["conversation"], resolve)


def make_eval_examples(data_config: Any, *, split: str = "validation", limit: Optional[int] = None) -> list[dict]:
    """The first `limit` records of `split` (stored order) as generation prompts with reference answers.

    Each example: id, task, answer (str; "" for JSONL data: the last assistant message's text instead),
    codec [c] int32, use_audio_in_video, conversation (messages before the last assistant reply, media
    inline as arrays / PIL images), to be used as
    ``processor([ex["conversation"]], use_audio_in_video=ex["use_audio_in_video"])``."""
    import tempfile

    source = load_source(data_config, split)
    n = len(source) if limit is None else min(int(limit), len(source))
    examples = []
    for i in range(n):
        rec = records.decode_record(source[i])
        with tempfile.TemporaryDirectory(prefix="omni_eval_", dir=records.scratch_dir()) as tmp:
            conversation = _inline_media(rec, tmp)
        last = max((k for k, m in enumerate(conversation) if m.get("role") == "assistant"), default=None)
        answer = rec["answer"]
        if last is not None:
            if not answer and isinstance(conversation[last]["content"], str):
                answer = conversation[last]["content"]
            conversation = conversation[:last]
        examples.append({"id": rec["id"], "task": rec["task"], "answer": answer, "codec": rec["codec"],
                         "use_audio_in_video": rec["use_audio_in_video"], "conversation": conversation})
    return examples


def batch_stats(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Packing efficiency of a batch: fraction of real tokens, samples per row."""
    seg = np.asarray(batch["segment_ids"])
    return {"fill": float((seg > 0).mean()), "samples_per_row": float(batch["num_samples"]) / seg.shape[0]}
