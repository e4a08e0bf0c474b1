"""`Processor`: conversations with text, images, audio and video -> a batch of numpy arrays.

    processor = Processor.from_pretrained(model_dir)
    batch = processor([conversation, ...], use_audio_in_video=False)

The batch has the HF ``Qwen2_5OmniProcessor`` key names (a key is absent when its modality is):

  input_ids [B, L] int64, attention_mask [B, L] int64      left padded with <|endoftext|> (151643) by default
  input_features [n_audio, 128, F] float32, feature_attention_mask [n_audio, F] int32
  pixel_values [sum t*h*w, 1176] float32, image_grid_thw [n_image, 3] int64
  pixel_values_videos [sum t*h*w, 1176] float32, video_grid_thw [n_video, 3] int64,
  video_second_per_grid [n_video] float32

Media of all conversations are concatenated in order of appearance (row by row), which is the order in which
their placeholder tokens appear in ``input_ids``. With ``use_audio_in_video`` a video's audio track takes its
place in that order among the audio inputs.

A media part is ``{"type": "image"|"audio"|"video", "image"|"audio"|"video": source, ...}`` where source is a
path (relative paths resolve against ``base_dir``), an array (audio: 16 kHz mono float waveform, or pass
``"sampling_rate"``; image: uint8 [H, W, 3]; video: uint8 [T, H, W, 3] frames already sampled at ``"fps"``,
default 2), a PIL image, a folder of frame images, or a list of frames. Optional per-part keys: images
``min_pixels``/``max_pixels``; videos ``fps``, ``min_pixels``, ``max_pixels``, ``total_pixels``,
``min_frames``, ``max_frames`` and, for frame inputs with ``use_audio_in_video``, ``audio_track`` (a path or
16 kHz waveform; not ``audio``: the chat template would take a part with an ``audio`` key for an audio part).

Placeholders expand to: ``<|IMAGE|>`` x t*h*w/4; ``<|AUDIO|>`` x the audio token count (25 per second);
``<|VIDEO|>`` x t*h*w/4, or with ``use_audio_in_video`` ``<|audio_bos|>`` + per 2-s chunk [video tokens,
audio tokens] + ``<|audio_eos|>`` (inside the template's ``<|vision_bos|>`` ... ``<|vision_eos|>``).

Bad media raise `MediaError` (a ValueError) naming the conversation, message and part, the input and the
problem; a malformed conversation raises ValueError naming the conversation and message.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omni_jax.processing.audio import (
    DEFAULT_FRAME_BUCKET,
    AudioFeatureConfig,
    audio_token_count,
    extract_features,
    num_feature_frames,
)
from omni_jax.processing.chat_template import render_chat
from omni_jax.processing.image import ImageProcessorConfig, preprocess_image
from omni_jax.processing.media import MediaError, describe_source, load_audio, load_image, load_video
from omni_jax.processing.tokenizer import (
    AUDIO_BOS_ID,
    AUDIO_EOS_ID,
    AUDIO_TOKEN_ID,
    ENDOFTEXT_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    Tokenizer,
)
from omni_jax.processing.video import VideoProcessorConfig, preprocess_video

__all__ = ["Processor", "chunk_bounds", "interleave_video_audio"]


def chunk_bounds(values: np.ndarray, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """Split a non-decreasing sequence of temporal values into [start, end) runs: a new run starts at the
    first element >= k * tokens_per_chunk, k advancing by one per split (HF ``get_chunked_index``)."""
    bounds, start, chunk = [], 0, 1
    for i, v in enumerate(values):
        if v >= chunk * tokens_per_chunk:
            bounds.append((start, i))
            start = i
            chunk += 1
    bounds.append((start, len(values)))
    return bounds


def interleave_video_audio(video_grid_thw: Sequence[int], second_per_grid: float, num_audio_tokens: int,
                           merge_size: int = 2, position_id_per_seconds: float = 25,
                           seconds_per_chunk: float = 2.0) -> list[int]:
    """Token ids replacing ``<|VIDEO|>`` when the video's audio is used: ``<|audio_bos|>``, then per chunk the
    video tokens and the audio tokens whose time index falls in it, then ``<|audio_eos|>``."""
    t, h, w = (int(v) for v in video_grid_thw)
    per_grid = (h // merge_size) * (w // merge_size)
    video_values = np.repeat(np.arange(t) * second_per_grid * position_id_per_seconds, per_grid)
    audio_values = np.arange(num_audio_tokens)
    tokens_per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video_chunks = chunk_bounds(video_values, tokens_per_chunk)
    audio_chunks = chunk_bounds(audio_values, tokens_per_chunk)
    ids = [AUDIO_BOS_ID]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        if j < len(video_chunks):
            ids += [VIDEO_TOKEN_ID] * (video_chunks[j][1] - video_chunks[j][0])
        if j < len(audio_chunks):
            ids += [AUDIO_TOKEN_ID] * (audio_chunks[j][1] - audio_chunks[j][0])
    ids.append(AUDIO_EOS_ID)
    return ids


def _part_kind(part: Mapping[str, Any]) -> str:
    """Same precedence as the chat template (render_chat has already validated the part)."""
    ptype = part.get("type")
    if ptype == "image" or "image" in part or "image_url" in part:
        return "image"
    if ptype == "audio" or "audio" in part or "audio_url" in part:
        return "audio"
    if ptype == "video" or "video" in part:
        return "video"
    return "text"


_PIXEL_KEYS = ("min_pixels", "max_pixels")
_VIDEO_KEYS = ("min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames")


@dataclasses.dataclass
class _Row:
    ids: list[int]
    images: list[tuple[np.ndarray, tuple[int, int, int]]]
    audios: list[np.ndarray]  # in placeholder order (video audio tracks included)
    videos: list[tuple[np.ndarray, tuple[int, int, int], float, np.ndarray | None]]
    media_order: list[str]  # "image" | "audio" | "video" in order of appearance


class Processor:
    """Qwen2.5-Omni processor (tokenizer + chat template + audio / image / video preprocessing), numpy only.

    Args:
      tokenizer: a `Tokenizer`.
      audio_config, image_config, video_config: preprocessing settings (released defaults).
      pad_audio_to_max: pad ``input_features`` to 30000 frames as HF does (default: the longest clip rounded up
        to ``audio_pad_to_multiple_of`` frames; valid frames are identical either way).
    """

    def __init__(self, tokenizer: Tokenizer, audio_config: AudioFeatureConfig = AudioFeatureConfig(),
                 image_config: ImageProcessorConfig = ImageProcessorConfig(),
                 video_config: VideoProcessorConfig = VideoProcessorConfig(), pad_audio_to_max: bool = False,
                 audio_pad_to_multiple_of: int = DEFAULT_FRAME_BUCKET, seconds_per_chunk: float = 2.0,
                 position_id_per_seconds: float = 25):
        self.tokenizer = tokenizer
        self.audio_config = audio_config
        self.image_config = image_config
        self.video_config = video_config
        self.pad_audio_to_max = pad_audio_to_max
        self.audio_pad_to_multiple_of = audio_pad_to_multiple_of
        self.seconds_per_chunk = seconds_per_chunk
        self.position_id_per_seconds = position_id_per_seconds
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = ENDOFTEXT_ID if pad is None else int(pad)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "Processor":
        """Tokenizer files plus ``preprocessor_config.json`` (audio + image settings) and
        ``video_preprocessor_config.json`` where present; released defaults otherwise."""
        path = Path(path)
        tokenizer = Tokenizer.from_pretrained(path)
        configs: dict[str, Any] = {}
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text(encoding="utf-8"))
            configs["audio_config"] = AudioFeatureConfig.from_dict(cfg)
            configs["image_config"] = ImageProcessorConfig.from_dict(cfg)
        vpre = path / "video_preprocessor_config.json"
        if vpre.is_file():
            configs["video_config"] = VideoProcessorConfig.from_dict(json.loads(vpre.read_text(encoding="utf-8")))
        configs.update(kwargs)
        return cls(tokenizer, **configs)

    # ---------------------------------------------------------------------------------------------- helpers
    def num_audio_tokens(self, num_samples: int) -> int:
        """LM tokens of a 16 kHz clip of ``num_samples`` samples."""
        return int(audio_token_count(num_feature_frames(num_samples, self.audio_config)))

    def _resolve(self, source: Any, base_dir: str | os.PathLike | None) -> Any:
        if isinstance(source, (str, os.PathLike)):
            s = os.fspath(source)
            if s.startswith("file://"):
                s = s[len("file://"):]
            if base_dir is not None and not os.path.isabs(s) and "://" not in s:
                s = os.path.join(os.fspath(base_dir), s)
            return s
        return source

    def _image(self, part: Mapping[str, Any], base_dir):
        source = self._resolve(part.get("image", part.get("image_url")), base_dir)
        if isinstance(source, Mapping) and "url" in source:  # OpenAI style {"image_url": {"url": ...}}
            source = self._resolve(source["url"], base_dir)
        config = self.image_config
        if any(k in part for k in _PIXEL_KEYS):
            config = dataclasses.replace(config, **{k: int(part[k]) for k in _PIXEL_KEYS if k in part})
        return source, lambda: preprocess_image(load_image(source), config)

    def _audio(self, part: Mapping[str, Any], base_dir):
        source = self._resolve(part.get("audio", part.get("audio_url")), base_dir)
        if isinstance(source, Mapping) and "url" in source:
            source = self._resolve(source["url"], base_dir)
        rate = part.get("sampling_rate")
        return source, lambda: load_audio(source, self.audio_config.sampling_rate, source_rate=rate)

    def _video(self, part: Mapping[str, Any], base_dir, with_audio: bool):
        source = self._resolve(part.get("video"), base_dir)
        config = self.video_config
        if any(k in part for k in _VIDEO_KEYS):
            config = dataclasses.replace(config, **{k: int(part[k]) for k in _VIDEO_KEYS if k in part})
        fps = part.get("fps")
        audio = self._resolve(part.get("audio_track"), base_dir)

        def run():
            video = load_video(source, config, fps=fps, load_audio_track=with_audio, audio=audio,
                               sampling_rate=self.audio_config.sampling_rate)
            patches, grid, seconds = preprocess_video(video.frames, config, video.fps)
            return patches, grid, seconds, video.audio

        return source, run

    def _process_row(self, index: int, conversation: Sequence[Mapping[str, Any]], use_audio_in_video: bool,
                     add_generation_prompt: bool, add_vision_id: bool, add_audio_id: bool, base_dir) -> _Row:
        try:
            text = render_chat(conversation, add_generation_prompt=add_generation_prompt,
                               add_vision_id=add_vision_id, add_audio_id=add_audio_id)
        except ValueError as err:
            raise ValueError(f"conversation {index}: {err}") from err
        row = _Row(ids=[], images=[], audios=[], videos=[], media_order=[])
        for j, message in enumerate(conversation):
            content = message["content"]
            if isinstance(content, str):
                continue
            for k, part in enumerate(content):
                kind = _part_kind(part)
                if kind == "text":
                    continue
                if kind == "image":
                    source, run = self._image(part, base_dir)
                elif kind == "audio":
                    source, run = self._audio(part, base_dir)
                else:
                    source, run = self._video(part, base_dir, use_audio_in_video)
                try:
                    result = run()
                except MediaError as err:
                    raise MediaError(f"conversation {index}, message {j}, part {k} ({kind}): {err}") from err
                except (ValueError, OSError) as err:
                    raise MediaError(f"conversation {index}, message {j}, part {k} ({kind} "
                                     f"{describe_source(source)}): {err}") from err
                track = result if kind == "audio" else (result[3] if kind == "video" else None)
                if track is not None and self.num_audio_tokens(track.shape[0]) < 1:
                    raise MediaError(
                        f"conversation {index}, message {j}, part {k} ({kind} {describe_source(source)}): audio is "
                        f"too short ({track.shape[0]} samples at {self.audio_config.sampling_rate} Hz) to give one "
                        f"audio token; at least {2 * self.audio_config.hop_length + 1} samples are needed")
                row.media_order.append(kind)
                if kind == "image":
                    row.images.append(result)
                elif kind == "audio":
                    row.audios.append(result)
                else:
                    row.videos.append(result)
                    if use_audio_in_video:
                        row.audios.append(result[3])
        row.ids = self._expand(index, self.tokenizer.encode(text), row, use_audio_in_video)
        return row

    def _expand(self, index: int, ids: list[int], row: _Row, use_audio_in_video: bool) -> list[int]:
        counts = {IMAGE_TOKEN_ID: ids.count(IMAGE_TOKEN_ID), AUDIO_TOKEN_ID: ids.count(AUDIO_TOKEN_ID),
                  VIDEO_TOKEN_ID: ids.count(VIDEO_TOKEN_ID)}
        n_audio_parts = len(row.audios) - (len(row.videos) if use_audio_in_video else 0)
        for tok, name, n in ((IMAGE_TOKEN_ID, "<|IMAGE|>", len(row.images)),
                             (AUDIO_TOKEN_ID, "<|AUDIO|>", n_audio_parts),
                             (VIDEO_TOKEN_ID, "<|VIDEO|>", len(row.videos))):
            if counts[tok] != n:
                raise ValueError(f"conversation {index}: the prompt has {counts[tok]} {name} tokens but {n} "
                                 f"{name[2:-2].lower()} parts (is a placeholder written in the text?)")
        merge2 = self.image_config.merge_size ** 2
        vmerge = self.video_config.merge_size
        images, videos = iter(row.images), iter(row.videos)
        audios = iter(row.audios)
        out: list[int] = []
        for tok in ids:
            if tok == IMAGE_TOKEN_ID:
                _, grid = next(images)
                out += [IMAGE_TOKEN_ID] * (int(np.prod(grid)) // merge2)
            elif tok == AUDIO_TOKEN_ID:
                out += [AUDIO_TOKEN_ID] * self.num_audio_tokens(next(audios).shape[0])
            elif tok == VIDEO_TOKEN_ID:
                _, grid, seconds, _ = next(videos)
                if use_audio_in_video:
                    n_a = self.num_audio_tokens(next(audios).shape[0])
                    out += interleave_video_audio(grid, seconds, n_a, vmerge, self.position_id_per_seconds,
                                                  self.seconds_per_chunk)
                else:
                    out += [VIDEO_TOKEN_ID] * (int(np.prod(grid)) // vmerge ** 2)
            else:
                out.append(tok)
        return out

    # ---------------------------------------------------------------------------------------------- call
    def __call__(self, conversations: Sequence[Sequence[Mapping[str, Any]]], use_audio_in_video: bool = False,
                 add_generation_prompt: bool = True, padding_side: str = "left",
                 base_dir: str | os.PathLike | None = None, add_vision_id: bool = False,
                 add_audio_id: bool = False, pad_audio_to_max: bool | None = None) -> dict[str, np.ndarray]:
        """Turn a batch of conversations into model inputs (see the module docstring for keys and shapes).

        A single conversation (a list of message dicts) is accepted as a batch of one."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(conversations, Sequence) and conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)) or not conversations:
            raise ValueError("conversations must be a non-empty list of conversations (lists of messages)")
        rows = [self._process_row(i, conv, use_audio_in_video, add_generation_prompt, add_vision_id,
                                  add_audio_id, base_dir) for i, conv in enumerate(conversations)]

        length = max(len(r.ids) for r in rows)
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int64)
        attention_mask = np.zeros((len(rows), length), np.int64)
        for b, r in enumerate(rows):
            n = len(r.ids)
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[b, sl] = r.ids
            attention_mask[b, sl] = 1
        batch: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}

        images = [im for r in rows for im in r.images]
        if images:
            batch["pixel_values"] = np.concatenate([p for p, _ in images], axis=0)
            batch["image_grid_thw"] = np.asarray([g for _, g in images], np.int64)
        videos = [v for r in rows for v in r.videos]
        if videos:
            batch["pixel_values_videos"] = np.concatenate([v[0] for v in videos], axis=0)
            batch["video_grid_thw"] = np.asarray([v[1] for v in videos], np.int64)
            batch["video_second_per_grid"] = np.asarray([v[2] for v in videos], np.float32)
        audios = [a for r in rows for a in r.audios]
        if audios:
            features, mask = extract_features(
                audios, self.audio_config,
                pad_to_max=self.pad_audio_to_max if pad_audio_to_max is None else pad_audio_to_max,
                pad_to_multiple_of=self.audio_pad_to_multiple_of)
            batch["input_features"] = features
            batch["feature_attention_mask"] = mask
        return batch

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
