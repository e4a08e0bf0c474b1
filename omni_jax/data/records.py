"""The record format shared by the TFDS builders (conversation JSONL and the omni_toy task).

One record = one conversation, self-contained: the media files' bytes are stored in the record, so a built
dataset does not depend on the original files (they may move or disappear after the build).

  id                   Text     where the sample came from ("train.jsonl:17", "omni_toy/train/42")
  conversation         Text     JSON list of messages; a media part's source is "media:K" = media entry K
  media                Sequence of {name: Text (original file name, keeps the suffix), data: bytes}
  use_audio_in_video   bool     process this conversation's videos with their audio tracks
  task                 Text     toy task name ("" for JSONL data)
  answer               Text     reference answer of the toy task ("" for JSONL data)
  codec                int32 [n] codec-token targets of the spoken answer (toy task; empty for JSONL data)

TFDS stores these without TensorFlow (array_record files; Text and bytes come back as Python bytes).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MEDIA_KINDS = ("image", "audio", "video")
MEDIA_REF_PREFIX = "media:"


def features():
    """The TFDS FeaturesDict of a record."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "conversation": tfds.features.Text(),
        "media": tfds.features.Sequence({
            "name": tfds.features.Text(),
            "data": tfds.features.Tensor(shape=(), dtype=np.object_),
        }),
        "use_audio_in_video": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "task": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "codec": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    })


def media_kind(part: Mapping[str, Any]) -> str | None:
    """'image' | 'audio' | 'video' for a media part (the chat template's precedence), None for text."""
    ptype = part.get("type")
    if ptype in ("image", "image_url") or "image" in part or "image_url" in part:
        return "image"
    if ptype in ("audio", "audio_url") or "audio" in part or "audio_url" in part:
        return "audio"
    if ptype == "video" or "video" in part:
        return "video"
    return None


def source_key(part: Mapping[str, Any], kind: str) -> str:
    """The key holding the media source of a part ("image", "image_url", "audio", "audio_url", "video")."""
    for key in (kind, f"{kind}_url"):
        if key in part:
            return key
    raise ValueError(f"{kind} part has no {kind!r} field")


def media_parts(conversation: Sequence[Mapping[str, Any]]):
    """Yield (message index, part index, part, kind) for every media part, in order of appearance."""
    for i, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for j, part in enumerate(content):
            if isinstance(part, Mapping):
                kind = media_kind(part)
                if kind is not None:
                    yield i, j, part, kind


def make_record(sample_id: str, conversation: list, media: list[tuple[str, bytes]], *,
                use_audio_in_video: bool = False, task: str = "", answer: str = "",
                codec: Sequence[int] = ()) -> dict[str, Any]:
    """A record dict as the builders yield it (``conversation`` already holds "media:K" references)."""
    return {
        "id": sample_id,
        "conversation": json.dumps(conversation, ensure_ascii=False),
        "media": [{"name": name, "data": data} for name, data in media],
        "use_audio_in_video": bool(use_audio_in_video),
        "task": task,
        "answer": answer,
        "codec": np.asarray(codec, np.int32).reshape(-1),
    }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as read back from the data source -> plain Python (str, list of (name, bytes), ...)."""
    media = record["media"]
    names = [_text(n) for n in media["name"]]
    data = [bytes(d) for d in media["data"]]
    return {
        "id": _text(record["id"]),
        "conversation": json.loads(_text(record["conversation"])),
        "media": list(zip(names, data)),
        "use_audio_in_video": bool(np.asarray(record["use_audio_in_video"])),
        "task": _text(record["task"]),
        "answer": _text(record["answer"]),
        "codec": np.asarray(record["codec"], np.int32).reshape(-1),
    }


def resolve_media(conversation: list, resolve) -> list:
    """A copy of ``conversation`` whose "media:K" sources are replaced by ``resolve(K, part, kind)``."""
    out = json.loads(json.dumps(conversation))
    for _, _, part, kind in media_parts(out):
        key = source_key(part, kind)
        ref = part[key]
        if not (isinstance(ref, str) and ref.startswith(MEDIA_REF_PREFIX)):
            raise ValueError(f"{kind} part source {ref!r} is not a stored media reference")
        part[key] = resolve(int(ref[len(MEDIA_REF_PREFIX):]), part, kind)
    return out


def write_media(media: list[tuple[str, bytes]], folder: str) -> list[str]:
    """Write the stored media files into ``folder`` (index-prefixed names, original suffix); their paths."""
    paths = []
    for k, (name, data) in enumerate(media):
        path = os.path.join(folder, f"{k}{os.path.splitext(name)[1]}")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def scratch_dir() -> str | None:
    """Where media are written for decoding: /dev/shm (memory) when present, else the default temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
