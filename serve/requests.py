"""Generation requests: the JSON format shared by the serving engine and the batch eval, with validation.

One request is a JSON object (one per line in a JSONL file)::

    {"id": "q1",
     "messages": [{"role": "system", "content": "..."},              # optional system turn
                  {"role": "user", "content": [{"type": "text", "text": "..."},
                                               {"type": "image", "image": "img.png"},
                                               {"type": "audio", "audio": "clip.wav"},
                                               {"type": "video", "video": "clip.mp4"}]}],
     "max_new_tokens": 64, "temperature": 0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0,
     "return_audio": false, "speaker": "Chelsie", "use_audio_in_video": false,
     "talker": {"max_new_tokens": 1024, "do_sample": true}}            # optional talker settings

Only ``id`` and ``messages`` are required; the other fields take the values shown (``talker``: the model's
defaults, `omni_jax.speech.TALKER_DEFAULTS`). ``temperature`` 0 is greedy. Relative media paths resolve against
``base_dir`` (the eval passes the requests file's folder). Media parts may carry the processor's per-part keys
(``min_pixels``, ``max_pixels``, ``fps``, ``max_frames``, ...; see `omni_jax.processing.processor`).

`parse_request` checks everything that can be checked without running the model (field names, types and
ranges, message structure through the chat template, that media files exist, the speaker). What needs the
processor (unreadable media, the prompt's length against the context) is checked by the engine per request.
Every failure is a `RequestError` whose message names the field and the problem.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

__all__ = ["Request", "RequestError", "parse_request", "read_requests", "DEFAULTS", "TALKER_KEYS"]

DEFAULTS: dict[str, Any] = dict(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                seed=0, return_audio=False, speaker="Chelsie", use_audio_in_video=False,
                                talker=None, stop=(), stop_token_ids=())
FIELDS = ("id", "messages") + tuple(DEFAULTS)
# Keys of omni_jax.speech.TALKER_DEFAULTS (kept here so that parsing imports no JAX) plus do_sample.
TALKER_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "do_sample")
MAX_SEED = 2 ** 31 - 1
_MEDIA_KEYS = {"image": ("image", "image_url"), "audio": ("audio", "audio_url"), "video": ("video",)}


class RequestError(ValueError):
    """A request that cannot be served; `request_id` / `line` say which one (either may be None)."""

    def __init__(self, message: str, request_id: Optional[str] = None, line: Optional[int] = None):
        super().__init__(message)
        self.request_id = request_id
        self.line = line


@dataclasses.dataclass
class Request:
    """A validated request (see the module docstring for the fields)."""

    id: str
    messages: list
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    return_audio: bool = False
    speaker: str = "Chelsie"
    use_audio_in_video: bool = False
    talker: Optional[dict] = None
    stop: tuple = ()  # stop strings: the reply ends before the first of them (not included), finish_reason "stop"
    stop_token_ids: tuple = ()  # extra end token ids (vLLM's stop_token_ids); the token is kept in token_ids
    base_dir: Optional[str] = None  # relative media paths resolve against it
    line: Optional[int] = None  # 1-based line in the requests file, when read from one

    @property
    def stochastic(self) -> bool:
        """Whether the output depends on random draws (sampled text, or speech: the talker samples by default
        and Token2Wav starts from noise), and so on the batch it runs in."""
        return self.temperature > 0 or self.return_audio


def _where(request_id, line) -> str:
    return f"request {request_id!r}" if request_id is not None else (f"line {line}" if line else "request")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_field(name: str, value: Any) -> Any:
    """Type/range check of one sampling/output field; returns the normalised value or raises ValueError."""
    if name == "max_new_tokens":
        if not _is_int(value) or value < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {value!r}")
        return int(value)
    if name == "temperature":
        if not _is_number(value) or value < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {value!r}")
        return float(value)
    if name == "top_k":
        if not _is_int(value) or value < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {value!r}")
        return int(value)
    if name == "top_p":
        if not _is_number(value) or not 0 < value <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {value!r}")
        return float(value)
    if name == "repetition_penalty":
        if not _is_number(value) or value <= 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {value!r}")
        return float(value)
    if name == "seed":
        if not _is_int(value) or not 0 <= value <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {value!r}")
        return int(value)
    if name in ("return_audio", "use_audio_in_video"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if name == "speaker":
        if not isinstance(value, str) or not value:
            raise ValueError(f"speaker must be a voice name (a non-empty string), got {value!r}")
        return value
    if name == "stop":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items) or len(items) > 16:
            raise ValueError(f"stop must be a non-empty string or a list of at most 16 of them, got {value!r}")
        return tuple(items)
    if name == "stop_token_ids":
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
            raise ValueError(f"stop_token_ids must be a list of token ids (integers >= 0), got {value!r}")
        return tuple(int(v) for v in value)
    if name == "talker":
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(f"talker must be an object with keys from {', '.join(TALKER_KEYS)}, got {value!r}")
        out = {}
        for key, v in value.items():
            if key not in TALKER_KEYS:
                raise ValueError(f"talker: unknown key {key!r} (known: {', '.join(TALKER_KEYS)})")
            out[key] = v if key == "do_sample" and isinstance(v, bool) else _check_field(key, v)
        return out
    raise AssertionError(name)


def _media_path(source: Any, base_dir: Optional[str]) -> str:
    """Resolved local path of a JSON media source, or ValueError."""
    if isinstance(source, Mapping) and "url" in source:  # OpenAI style {"image_url": {"url": ...}}
        source = source["url"]
    if not isinstance(source, str) or not source:
        raise ValueError(f"the media source must be a file path (a string), got {source!r}")
    path = source[len("file://"):] if source.startswith("file://") else source
    if "://" in path:
        raise ValueError(f"{source!r}: URLs are not fetched (no network at run time); download the file and "
                         "give its path")
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return path


def _check_media(messages: Sequence[Mapping[str, Any]], base_dir: Optional[str]) -> None:
    """Every media part names an existing file (or, for a video, a folder of frames / a list of frame files)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            continue
        for j, part in enumerate(content):
            kind = next((k for k, keys in _MEDIA_KEYS.items()
                         if part.get("type") in (k, f"{k}_url") or any(key in part for key in keys)), None)
            if kind is None:
                continue
            where = f"messages[{i}].content[{j}] ({kind})"
            source = next((part[key] for key in _MEDIA_KEYS[kind] if key in part), None)
            sources = source if kind == "video" and isinstance(source, list) else [source]
            if not sources:
                raise ValueError(f"{where}: empty list of frames")
            for s in sources:
                try:
                    path = _media_path(s, base_dir)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
                if not os.path.exists(path):
                    resolved = "" if path == s else f" (resolved to {path!r})"
                    raise ValueError(f"{where}: file not found: {s!r}{resolved}")


def parse_request(obj: Any, *, base_dir: Optional[str] = None, line: Optional[int] = None,
                  speakers: Optional[Sequence[str]] = None, has_speech: Optional[bool] = None) -> Request:
    """Validate one request object (a dict, as decoded from JSON) and return a `Request`.

    speakers: the voice names the model knows (checked when return_audio; None = not checked);
    has_speech: whether the model can speak (None = not checked). Raises `RequestError`.
    """
    request_id = obj.get("id") if isinstance(obj, Mapping) else None
    request_id = request_id if isinstance(request_id, str) and request_id else None

    def fail(message: str):
        raise RequestError(f"{_where(request_id, line)}: {message}", request_id, line)

    if not isinstance(obj, Mapping):
        fail(f"a request must be a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        fail(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
             f"(known: {', '.join(FIELDS)})")
    if "id" not in obj:
        fail("missing 'id' (every request needs a unique string id)")
    if request_id is None:
        fail(f"'id' must be a non-empty string, got {obj['id']!r}")
    if "messages" not in obj:
        fail("missing 'messages'")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        fail(f"'messages' must be a non-empty list of messages, got {messages!r:.80}")
    try:
        from omni_jax.processing.chat_template import render_chat

        render_chat(messages)  # roles, content shapes, part types (names the message and part)
    except ValueError as err:
        fail(f"messages: {err}")
    if not any(m.get("role") == "user" for m in messages):
        fail("messages: there is no user message")
    values = {}
    for name, default in DEFAULTS.items():
        try:
            values[name] = _check_field(name, obj[name]) if name in obj else default
        except ValueError as err:
            fail(str(err))
    if values["return_audio"]:
        if has_speech is False:
            fail("return_audio: this model has no talker/token2wav, so speech output is not available")
        if speakers is not None and values["speaker"] not in speakers:
            known = ", ".join(sorted(speakers)) or "none (the model has no voices)"
            fail(f"unknown speaker {values['speaker']!r}; known speakers: {known}")
        if values["max_new_tokens"] < 2:
            fail("return_audio needs max_new_tokens >= 2 (the talker reads the reply one token behind)")
    try:
        _check_media(messages, base_dir)
    except ValueError as err:
        fail(str(err))
    return Request(id=request_id, messages=messages, base_dir=base_dir, line=line, **values)


def read_requests(path: str, *, base_dir: Optional[str] = None, speakers: Optional[Sequence[str]] = None,
                  has_speech: Optional[bool] = None) -> Iterator[Request | RequestError]:
    """Parse a JSONL requests file: yields a `Request` or a `RequestError` per non-blank line, in file order.

    base_dir defaults to the file's folder. A line that is not JSON, or not a valid request, or whose id an
    earlier line already used, yields a RequestError (with `line`, and `request_id` where the line has a
    string id; a duplicate's error has no request_id, the id belongs to the first line). Raises OSError when the file cannot be opened (a job-level failure, not a request's).
    """
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(path))
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield RequestError(f"line {lineno}: not UTF-8 text ({err.reason} at byte {err.start})", None, lineno)
                continue
            except json.JSONDecodeError as err:
                yield RequestError(f"line {lineno}: not valid JSON: {err.msg} (column {err.colno})", None, lineno)
                continue
            request_id = obj.get("id") if isinstance(obj, dict) else None
            if isinstance(request_id, str) and request_id:
                if request_id in first_line:  # request_id None: the id belongs to the earlier line
                    yield RequestError(f"line {lineno}: duplicate id {request_id!r} (line "
                                       f"{first_line[request_id]} already uses it); this line is skipped",
                                       None, lineno)
                    continue
                first_line[request_id] = lineno
            try:
                yield parse_request(obj, base_dir=base_dir, line=lineno, speakers=speakers, has_speech=has_speech)
            except RequestError as err:
                yield err
