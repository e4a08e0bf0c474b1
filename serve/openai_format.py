"""OpenAI chat-completions requests and responses <-> the engine's requests and events (no HTTP here).

Request body (`POST /v1/chat/completions`), the fields read:
  * `messages`: roles system / user / assistant; content a string or a list of parts:
      {"type": "text", "text": ...}
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "/local/path.png" | "file://..."}}
      {"type": "input_audio", "input_audio": {"data": "<base64 wav>", "format": "wav"}}
      {"type": "video_url", "video_url": {"url": "/local/path.mp4"}}   (vLLM's spelling; "video" with a path too)
  * `max_tokens` / `max_completion_tokens`, `temperature` (default 1, as OpenAI), `top_p`, `seed`, `stop`,
    `n` (1 only); vLLM's extras `top_k`, `repetition_penalty`, `stop_token_ids`, `use_audio_in_video`;
  * `modalities: ["text", "audio"]` with `audio: {"voice": ..., "format": "wav" | "pcm16"}`;
  * `stream`, `stream_options: {"include_usage": true}`.
Other OpenAI fields that change nothing here (`user`, `metadata`, `store`, ...) are accepted and ignored; a field
that would change the result and is not supported (`n` > 1, `tools`, `logprobs`, ...) is a 400 naming it.

Media given as data are written to a per-request folder that the server removes when the request ends.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import time
from typing import Any, Mapping, Optional

import numpy as np

from serve.events import SAMPLE_RATE

IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction",
                            "reasoning_effort", "frequency_penalty", "presence_penalty", "logit_bias"})
UNSUPPORTED_FIELDS = {"tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
                      "function_call": "function calls", "logprobs": "log probabilities",
                      "top_logprobs": "log probabilities", "response_format": "structured output",
                      "web_search_options": "web search"}
KNOWN_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                          "stop", "n", "top_k", "repetition_penalty", "stop_token_ids", "use_audio_in_video",
                          "modalities", "audio", "stream", "stream_options"})
_MIME_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
             "image/gif": ".gif", "image/bmp": ".bmp", "audio/wav": ".wav", "audio/x-wav": ".wav",
             "audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/flac": ".flac", "audio/ogg": ".ogg", "video/mp4": ".mp4"}
_AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg", "pcm16": ".pcm16"}


class BadRequest(ValueError):
    """A request the server rejects with 400; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as err:
        raise BadRequest(f"{where}: not valid base64 data ({err})", where) from err


def _write(folder: str, index: int, ext: str, data: bytes) -> str:
    path = os.path.join(folder, f"part{index}{ext}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _media_url(url: Any, folder: str, index: int, where: str) -> str:
    """A data URL (written to `folder`), a file:// URL or a local path -> a local path."""
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: expected a URL string", where)
    match = re.match(r"data:([\w/+.-]+)?(;[\w=-]+)*;base64,(.*)$", url, re.S)
    if match:
        mime = (match.group(1) or "").lower()
        return _write(folder, index, _MIME_EXT.get(mime, ""), _b64(match.group(3), where))
    if re.match(r"^(https?|ftp)://", url):
        raise BadRequest(f"{where}: remote URLs are not fetched by this server; send the media as a data URL or a "
                         "local path", where)
    return url[len("file://"):] if url.startswith("file://") else url


def _pcm16_to_wav(data: bytes, folder: str, index: int) -> str:
    import soundfile as sf

    samples = np.frombuffer(data[: len(data) // 2 * 2], "<i2")
    path = os.path.join(folder, f"part{index}.wav")
    sf.write(path, samples, 24000, subtype="PCM_16")  # OpenAI pcm16 audio is 24 kHz mono
    return path


def convert_messages(messages: Any, folder: str) -> list:
    """OpenAI messages -> the engine's messages (media as local paths)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of messages", "messages")
    out = []
    index = 0
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, Mapping):
            raise BadRequest(f"{where}: expected an object with role and content", where)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"{where}.role: expected system, user or assistant, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str) or content is None:
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{where}.content: expected a string or a list of parts", f"{where}.content")
        parts = []
        for p, part in enumerate(content):
            pw = f"{where}.content[{p}]"
            if not isinstance(part, Mapping):
                raise BadRequest(f"{pw}: expected an object with a type", pw)
            kind = part.get("type")
            index += 1
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else image
                parts.append({"type": "image", "image": _media_url(url, folder, index, f"{pw}.image_url.url")})
            elif kind == "input_audio":
                audio = part.get("input_audio")
                if not isinstance(audio, Mapping) or "data" not in audio:
                    raise BadRequest(f"{pw}.input_audio: expected {{data: <base64>, format: wav}}", f"{pw}.input_audio")
                fmt = str(audio.get("format", "wav")).lower()
                if fmt not in _AUDIO_FORMATS:
                    raise BadRequest(f"{pw}.input_audio.format: expected one of {', '.join(_AUDIO_FORMATS)}, got "
                                     f"{fmt!r}", f"{pw}.input_audio.format")
                data = _b64(audio["data"], f"{pw}.input_audio.data")
                path = (_pcm16_to_wav(data, folder, index) if fmt == "pcm16"
                        else _write(folder, index, _AUDIO_FORMATS[fmt], data))
                parts.append({"type": "audio", "audio": path})
            elif kind in ("video_url", "video"):
                video = part.get("video_url") if kind == "video_url" else part.get("video")
                url = video.get("url") if isinstance(video, Mapping) else video
                parts.append({"type": "video", "video": _media_url(url, folder, index, f"{pw}.{kind}")})
            else:
                raise BadRequest(f"{pw}.type: unsupported part type {kind!r} (text, image_url, input_audio, "
                                 "video_url)", f"{pw}.type")
        out.append({"role": role, "content": parts})
    return out


def to_engine_request(body: Any, request_id: str, folder: str, voices: list[str]) -> tuple[dict, dict]:
    """A chat-completions body -> (engine request dict, response options {stream, include_usage, audio_format})."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    for field in body:
        if field in UNSUPPORTED_FIELDS and body[field] not in (None, False, [], {}):
            raise BadRequest(f"{field}: {UNSUPPORTED_FIELDS[field]} are not supported by this server", field)
        if field not in KNOWN_FIELDS and field not in IGNORED_FIELDS and field not in UNSUPPORTED_FIELDS:
            raise BadRequest(f"{field}: unknown parameter", field)
    if body.get("n", 1) not in (1, None):
        raise BadRequest(f"n: only n=1 is supported, got {body['n']!r}", "n")
    req: dict[str, Any] = {"id": request_id, "messages": convert_messages(body.get("messages"), folder)}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        req["max_new_tokens"] = max_tokens
    req["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]
    for src, dst in (("top_p", "top_p"), ("seed", "seed"), ("top_k", "top_k"),
                     ("repetition_penalty", "repetition_penalty"), ("stop_token_ids", "stop_token_ids"),
                     ("use_audio_in_video", "use_audio_in_video"), ("stop", "stop")):
        if body.get(src) is not None:
            req[dst] = body[src]
    if isinstance(req.get("top_k"), int) and req["top_k"] == -1:  # vLLM's "off"
        req["top_k"] = 0
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"} or "text" not in modalities:
        raise BadRequest(f"modalities: expected [\"text\"] or [\"text\", \"audio\"], got {modalities!r}", "modalities")
    audio_format = None
    if "audio" in modalities:
        audio = body.get("audio")
        if not isinstance(audio, Mapping):
            raise BadRequest("audio: with modalities [\"text\", \"audio\"], give audio: {voice, format}", "audio")
        voice = audio.get("voice")
        if voice not in voices:
            raise BadRequest(f"audio.voice: unknown voice {voice!r}; known voices: {', '.join(voices) or 'none'}",
                             "audio.voice")
        audio_format = audio.get("format", "wav")
        if audio_format not in ("wav", "pcm16"):
            raise BadRequest(f"audio.format: expected wav or pcm16, got {audio_format!r}", "audio.format")
        req["return_audio"] = True
        req["speaker"] = voice
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    if body.get("stream_options") is not None and not isinstance(options, Mapping):
        raise BadRequest("stream_options: expected an object", "stream_options")
    return req, {"stream": stream, "include_usage": bool(options.get("include_usage", False)),
                 "audio_format": audio_format}


FIELD_NAMES = {"max_new_tokens": "max_tokens", "speaker": "audio.voice", "return_audio": "modalities"}


def param_of(message: str) -> Optional[str]:
    """The request field an engine error message is about (its field names mapped to OpenAI's)."""
    if message.startswith("prompt too long"):
        return "messages"
    for field in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop_token_ids",
                  "stop", "speaker", "return_audio", "use_audio_in_video", "messages"):
        if re.search(rf"\b{field}\b", message):
            return FIELD_NAMES.get(field, field)
    if "speaker" in message or "voice" in message:
        return "audio.voice"
    if "prompt" in message or "media" in message or "file" in message or "image" in message or "audio" in message:
        return "messages"
    return None


def to_openai_message(text: str) -> str:
    """Engine field names in a message -> OpenAI's (what the client sent)."""
    for ours, theirs in (("max_new_tokens", "max_tokens"), ("speaker", "voice")):
        text = text.replace(ours, theirs)
    return text


def wav_bytes(audio: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def pcm16_bytes(audio: np.ndarray) -> bytes:
    return (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, audio: Optional[np.ndarray], audio_format: Optional[str]) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if audio is not None:
        data = wav_bytes(audio) if audio_format == "wav" else pcm16_bytes(audio)
        message["audio"] = {"id": f"audio-{request_id}", "data": base64.b64encode(data).decode(),
                            "expires_at": int(time.time()) + 3600, "transcript": text}
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: Optional[str] = None,
          usage_: Optional[dict] = None, created: Optional[int] = None) -> dict:
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created or int(time.time()),
           "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out
