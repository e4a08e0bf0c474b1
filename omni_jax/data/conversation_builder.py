"""TFDS builder `conversation_jsonl`: conversation JSONL files -> a self-contained array_record dataset.

Input: one JSON object per line, the format LLaMA-Factory / ms-swift multimodal data uses::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/cat.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}],
     "use_audio_in_video": false}                      # optional, per line

Media sources are local file paths, relative to the JSONL file's folder (absolute paths and ``file://`` work
too). Every media file is read and decoded once at build time with the Processor's own loaders; its bytes are
stored in the record (records.py), so the dataset is self-contained.

Bad lines are skipped and counted by reason, never fatal: ``bad_json`` (not a JSON object with a
``messages`` list), ``bad_conversation`` (the chat template rejects it), ``no_assistant_turn`` (nothing to
learn), ``missing_media``, ``corrupt_media`` (the loader cannot decode it), ``unsupported_media`` (not a
local file: URLs, frame folders, inline arrays). Counts go to the build log and to the dataset metadata
(``builder.info.metadata["build_report"][split]``).

    builder = ConversationJsonl(data_dir=DIR, splits={"train": "train.jsonl"}, config="mydata")
    builder.download_and_prepare()
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

from omni_jax.data import records
from omni_jax.processing.chat_template import render_chat
from omni_jax.processing.media import MediaError, load_audio, load_image, load_video
from omni_jax.processing.video import VideoProcessorConfig

log = logging.getLogger(__name__)

SKIP_REASONS = ("bad_json", "bad_conversation", "no_assistant_turn", "missing_media", "corrupt_media",
                "unsupported_media")
_VIDEO_KEYS = ("min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames")


class BadSample(ValueError):
    """A line that is skipped; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _media_path(source: Any, base_dir: str, kind: str) -> str:
    if isinstance(source, Mapping) and "url" in source:  # OpenAI style {"image_url": {"url": ...}}
        source = source["url"]
    if not isinstance(source, str):
        raise BadSample("unsupported_media", f"{kind} source must be a file path, got {type(source).__name__}")
    path = source[len("file://"):] if source.startswith("file://") else source
    if "://" in path:
        raise BadSample("unsupported_media", f"{kind} source {source!r} is a URL; only local files are stored")
    path = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if not os.path.exists(path):
        raise BadSample("missing_media", f"{kind} file not found: {path!r}")
    if not os.path.isfile(path):
        raise BadSample("unsupported_media", f"{kind} source {path!r} is not a file (frame folders are not stored)")
    return path


def _check_decodes(path: str, part: Mapping[str, Any], kind: str, use_audio_in_video: bool) -> None:
    """Decode the file as the Processor will (raises BadSample('corrupt_media'))."""
    try:
        if kind == "image":
            load_image(path)
        elif kind == "audio":
            load_audio(path)
        else:
            config = VideoProcessorConfig()
            if any(k in part for k in _VIDEO_KEYS):
                config = dataclasses.replace(config, **{k: int(part[k]) for k in _VIDEO_KEYS if k in part})
            load_video(path, config, fps=part.get("fps"), load_audio_track=use_audio_in_video)
    except (MediaError, OSError, ValueError) as err:
        raise BadSample("corrupt_media", f"{kind} file {path!r} cannot be decoded: {err}") from err


def _has_assistant_reply(messages: list) -> bool:
    for m in messages:
        if m.get("role") != "assistant":
            continue
        content = m.get("content")
        if isinstance(content, str) and content.strip():
            return True
        if isinstance(content, list) and content:
            return True
    return False


def parse_line(line: str, base_dir: str, default_use_audio_in_video: bool = False):
    """One JSONL line -> (conversation with "media:K" references, [(name, bytes)], use_audio_in_video).

    Raises BadSample naming the reason and the problem."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadSample("bad_json", f"not valid JSON: {err}") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise BadSample("bad_json", "expected a JSON object with a 'messages' list")
    messages = obj["messages"]
    try:
        render_chat(messages, add_generation_prompt=False)
    except ValueError as err:
        raise BadSample("bad_conversation", str(err)) from err
    if not _has_assistant_reply(messages):
        raise BadSample("no_assistant_turn", "the conversation has no non-empty assistant message")
    use_aiv = bool(obj.get("use_audio_in_video", default_use_audio_in_video))

    conversation = json.loads(json.dumps(messages))  # a copy we rewrite
    media: list[tuple[str, bytes]] = []
    for i, j, part, kind in records.media_parts(conversation):
        where = f"message {i}, part {j}"
        key = records.source_key(part, kind)
        try:
            path = _media_path(part[key], base_dir, kind)
            _check_decodes(path, part, kind, use_aiv)
        except BadSample as err:
            raise BadSample(err.reason, f"{where}: {err}") from err
        if "audio_track" in part:
            raise BadSample("unsupported_media", f"{where}: 'audio_track' (for frame inputs) is not stored")
        with open(path, "rb") as f:
            media.append((os.path.basename(path), f.read()))
        part[key] = f"{records.MEDIA_REF_PREFIX}{len(media) - 1}"
    return conversation, media, use_aiv


class ConversationJsonl(tfds.core.GeneratorBasedBuilder):
    """Conversation JSONL -> array_record records (see the module docstring).

    Args:
      splits: {split name: JSONL path}; needed to build, not to load a built dataset.
      config: a name for this dataset inside ``data_dir`` (several JSONL datasets can share one data_dir).
      use_audio_in_video: default for lines without the key.
      data_dir, file_format, ...: as for any TFDS builder (file_format defaults to array_record).
    """

    # No download checksums file: TFDS derives one from the code path, which on Python >= 3.9 without the
    # `importlib_resources` backport fails (tensorflow_datasets 4.9.10); these builders download nothing.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records with media bytes, conversation JSON, skip counts in metadata."}

    def __init__(self, *, splits: Mapping[str, str] | None = None, config: str = "default",
                 use_audio_in_video: bool = False, file_format: str = "array_record", **kwargs):
        self._splits = dict(splits or {})
        self._use_audio_in_video = use_audio_in_video
        super().__init__(config=tfds.core.BuilderConfig(name=config), file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=records.features(),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        if not self._splits:
            raise ValueError("conversation_jsonl: give splits={'train': 'path/to/train.jsonl', ...} to build")
        for split, path in self._splits.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"conversation_jsonl split {split!r}: JSONL file not found: {path!r}")
        return {split: self._generate_examples(split, path) for split, path in self._splits.items()}

    def _generate_examples(self, split: str, path: str):
        base_dir = os.path.dirname(os.path.abspath(path))
        skipped: Counter = Counter()
        lines = kept = 0
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                lines += 1
                sample_id = f"{os.path.basename(path)}:{line_no}"
                try:
                    conversation, media, use_aiv = parse_line(line, base_dir, self._use_audio_in_video)
                except BadSample as err:
                    skipped[err.reason] += 1
                    log.warning("conversation_jsonl: skipping %s (%s): %s", sample_id, err.reason, err)
                    continue
                kept += 1
                yield sample_id, records.make_record(sample_id, conversation, media, use_audio_in_video=use_aiv)
        report = {"source": os.path.abspath(path), "lines": lines, "kept": kept,
                  "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS}}
        self.info.metadata.setdefault("build_report", {})[split] = report
        log.warning("conversation_jsonl %s: %d lines, %d kept, skipped %s", split, lines, kept,
                    dict(skipped) or "none")


def build_conversation_dataset(splits: Mapping[str, str], data_dir: str, config: str = "default",
                               use_audio_in_video: bool = False) -> ConversationJsonl:
    """Build (or reuse, when already built) a conversation_jsonl dataset; returns the builder."""
    builder = ConversationJsonl(splits=splits, config=config, data_dir=data_dir,
                                use_audio_in_video=use_audio_in_video)
    builder.download_and_prepare()
    return builder
