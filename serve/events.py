"""What the serving engine reports per request, in order: text deltas and audio chunks as they are made, then
`Finished` or `Failed`."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np

from omni_jax.speech import SAMPLE_RATE  # Token2Wav output rate
from serve.requests import Request, RequestError

__all__ = ["TextDelta", "AudioChunk", "Finished", "Failed", "Event", "SAMPLE_RATE", "error_message"]


class _OfRequest:
    """`id`: the id of the event's request."""

    request: Request

    @property
    def id(self) -> str:
        return self.request.id


@dataclasses.dataclass
class TextDelta(_OfRequest):
    """Newly decoded text of a request, as it streams (complete UTF-8 characters only)."""

    request: Request
    text: str


@dataclasses.dataclass
class AudioChunk(_OfRequest):
    """A piece of a request's speech (float32 at SAMPLE_RATE), in order; the chunks add up to `Finished.audio`."""

    request: Request
    audio: np.ndarray
    index: int  # 0, 1, ... per request


@dataclasses.dataclass
class Finished(_OfRequest):
    """A completed request. The text deltas add up to `text`."""

    request: Request
    text: str
    token_ids: list[int]  # generated ids, up to and including the end token when there is one
    finish_reason: str  # "stop" (an end token, a stop token id or a stop string) or "length"
    audio: Optional[np.ndarray]  # float32 waveform at SAMPLE_RATE, or None
    timings: dict[str, float]


@dataclasses.dataclass
class Failed(_OfRequest):
    """A request that could not be served; `error` says why."""

    request: Request
    error: str
    kind: str = "invalid"  # "invalid" (the request: a 4xx), "internal" (generation failed: a 5xx) or "cancelled"


Event = Union[TextDelta, AudioChunk, Finished, Failed]


def error_message(err: BaseException) -> str:
    """A one-line error message; the processor's "conversation 0, " prefix is dropped (one request = one
    conversation)."""
    text = str(err).strip() or type(err).__name__
    for prefix in ("conversation 0, ", "conversation 0: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    if not isinstance(err, (ValueError, RequestError)):
        text = f"{type(err).__name__}: {text}"
    return text
