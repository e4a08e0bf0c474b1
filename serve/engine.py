"""The serving engine: queue requests, group compatible ones into batches, stream per-request events.

    engine = Engine(model, processor, max_batch=8)
    engine.submit({"id": "q1", "messages": [...], "max_new_tokens": 32})   # or a serve.requests.Request
    for event in engine.run():                    # runs until the queue is empty
        if isinstance(event, TextDelta): print(event.text, end="")
        elif isinstance(event, Finished): ...     # text, token_ids, audio, timings
        elif isinstance(event, Failed): ...       # error (a message naming the problem)

How a batch is formed:
  * Requests are grouped by what one `OmniModel.generate` call must share: `use_audio_in_video`,
    `return_audio` (and, for speech, the speaker and talker settings) and a bucket of `max_new_tokens`
    (rounded up to a power of two from 16; each row is cut back to its own limit afterwards, which is exact:
    tokens never depend on later steps. Speech rows use their exact value: the talker reads the whole reply).
    Sampling parameters are per row.
  * Stochastic requests (temperature > 0, or return_audio: the talker samples and Token2Wav starts from
    noise) run alone by default, so that their output depends only on the request and its seed, not on which
    other requests shared the batch. `batch_stochastic=True` batches them (grouped by seed) for throughput.
  * The oldest pending request picks the group; its batch is filled with the oldest compatible requests.
  * Each request's media are processed on their own first (`Processor` on the single conversation), so an
    unreadable file or a prompt longer than the context fails only that request; the rows are then merged
    into one left-padded batch (`merge_batches`).
  * If generation of a batch fails, the batch is split in halves and each half retried, down to single
    requests: the request that fails alone gets a `Failed` event, the others complete.

Timings (seconds) in `Finished.timings`: `queue` (submit -> start of its preprocessing), `preprocess` (its
media and tokens), `prefill` (batch generate start -> first token, including any compilation for a new shape),
`decode` (first token -> last thinker token), `speech` (talker + Token2Wav), `total` (submit -> finished),
`new_tokens`, `tokens_per_s` (new_tokens / (prefill + decode)), `batch_size`, `padded_batch_size` (rows
actually run: text-only batches are padded to a batch bucket), `attempts`.
Events: `TextDelta` (text as it streams), `AudioChunk` (speech pieces: streamed by the model when its generate
takes `on_audio`, else the whole waveform as one chunk), then `Finished` or `Failed` per request.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from omni_jax.speech import SAMPLE_RATE  # Token2Wav output rate
from serve.requests import Request, RequestError, parse_request

__all__ = ["Engine", "TextDelta", "AudioChunk", "Finished", "Failed", "Event", "merge_batches", "SAMPLE_RATE"]

NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass
class TextDelta:
    """Newly decoded text of a request, as it streams (complete UTF-8 characters only)."""

    request: Request
    text: str

    @property
    def id(self) -> str:
        return self.request.id


@dataclasses.dataclass
class Finished:
    """A completed request. `text` is authoritative (the deltas add up to it, but see `Engine` on retries)."""

    request: Request
    text: str
    token_ids: list[int]  # generated ids, up to and including the end token when there is one
    finish_reason: str  # "stop" (an end token) or "length" (max_new_tokens reached)
    audio: Optional[np.ndarray]  # float32 waveform at SAMPLE_RATE, or None
    timings: dict[str, float]

    @property
    def id(self) -> str:
        return self.request.id


@dataclasses.dataclass
class Failed:
    """A request that could not be served; `error` says why."""

    request: Request
    error: str
    kind: str = "invalid"  # "invalid" (the request: a 4xx), "internal" (generation failed: a 5xx) or "cancelled"

    @property
    def id(self) -> str:
        return self.request.id


@dataclasses.dataclass
class AudioChunk:
    """A piece of a request's speech (float32 at SAMPLE_RATE), in order; the chunks add up to `Finished.audio`."""

    request: Request
    audio: np.ndarray
    index: int  # 0, 1, ... per request

    @property
    def id(self) -> str:
        return self.request.id


Event = Union[TextDelta, AudioChunk, Finished, Failed]


def merge_batches(batches: Sequence[Mapping[str, np.ndarray]], pad_token_id: int) -> dict[str, np.ndarray]:
    """Merge single-conversation processor batches into one left-padded batch, as the processor would build it
    from all conversations at once: ids left padded, media arrays concatenated in row order, audio features
    padded along frames (padded frames are masked out, so their values do not matter)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    rows = sum(b["input_ids"].shape[0] for b in batches)
    input_ids = np.full((rows, length), pad_token_id, np.int64)
    attention_mask = np.zeros((rows, length), np.int64)
    r = 0
    for b in batches:
        n, width = b["input_ids"].shape
        input_ids[r:r + n, length - width:] = b["input_ids"]
        attention_mask[r:r + n, length - width:] = b["attention_mask"]
        r += n
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [b[key] for b in batches if key in b]
        if parts:
            out[key] = np.concatenate(parts, axis=0)
    with_audio = [b for b in batches if "input_features" in b]
    if with_audio:
        frames = max(b["input_features"].shape[-1] for b in with_audio)
        features, masks = [], []
        for b in with_audio:
            extra = frames - b["input_features"].shape[-1]
            features.append(np.pad(b["input_features"], ((0, 0), (0, 0), (0, extra)), mode="edge"))
            masks.append(np.pad(b["feature_attention_mask"], ((0, 0), (0, extra))))
        out["input_features"] = np.concatenate(features, axis=0)
        out["feature_attention_mask"] = np.concatenate(masks, axis=0)
    return out


@dataclasses.dataclass
class _Pending:
    request: Request
    seq: int
    submitted: float
    # filled by preprocessing:
    batch: Optional[dict] = None
    prompt_len: int = 0
    queue_s: float = 0.0
    preprocess_s: float = 0.0


class Engine:
    """Batched generation over a queue of requests (see the module docstring).

    Args:
      model: an `omni_jax.OmniModel`.
      processor: an `omni_jax.Processor` (its tokenizer decodes the replies).
      max_batch: most requests per `generate` call.
      stream: emit `TextDelta` events while decoding (every `stream_every` decode steps); without it the
        decode loop runs on device to the end in one call.
      batch_stochastic: batch sampled / speech requests together (grouped by seed) instead of one by one.
      eos_token_id: end token(s) (default: the model's).
      batch_buckets: text-only batches are padded (with copies of their last row, whose outputs are dropped)
        up to the next of these sizes, so that at most len(batch_buckets) batch shapes are compiled per
        prompt-length bucket; () turns the padding off.
    """

    def __init__(self, model, processor, max_batch: int = 8, stream: bool = True, stream_every: int = 8,
                 batch_stochastic: bool = False, eos_token_id: int | Sequence[int] | None = None,
                 new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS, batch_buckets: Sequence[int] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch = int(max_batch)
        self.stream = stream
        self.stream_every = int(stream_every)
        self.batch_stochastic = batch_stochastic
        self.new_token_buckets = tuple(sorted(new_token_buckets))
        if batch_buckets is None:
            batch_buckets = sorted({min(2 ** i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})
        self.batch_buckets = tuple(sorted(batch_buckets))
        # On a mesh the batch is split over the data-parallel axes: every batch is padded to a multiple of them.
        mesh = getattr(model, "mesh", None)
        self.row_multiple = 1 if mesh is None else int(np.prod([mesh.shape.get(a, 1) for a in ("data", "fsdp")]))
        eos = eos_token_id if eos_token_id is not None else (
            getattr(model.config.thinker, "eos_token_id", None) or 151645)
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.max_positions = int(model.config.thinker.text.max_position_embeddings)
        speech = getattr(model, "speech", None)
        self.has_speech = speech is not None
        self.speakers = sorted(speech.speakers) if speech is not None else []
        self._lock = threading.Lock()
        self._groups: "collections.OrderedDict[tuple, collections.deque[_Pending]]" = collections.OrderedDict()
        self._seq = itertools.count()
        self._emitted: dict[int, str] = {}  # seq -> text already streamed (so that retries do not repeat it)

    # ------------------------------------------------------------------------------------------ queue
    def parse(self, obj: Mapping[str, Any], base_dir: Optional[str] = None) -> Request:
        """Validate a request dict against this model (speakers, speech); raises RequestError."""
        return parse_request(obj, base_dir=base_dir, speakers=self.speakers, has_speech=self.has_speech)

    def submit(self, request: Request | Mapping[str, Any], base_dir: Optional[str] = None) -> Request:
        """Queue a request (a `Request`, or a dict validated with `parse`; RequestError if it is invalid)."""
        if not isinstance(request, Request):
            request = self.parse(request, base_dir)
        seq = next(self._seq)
        pending = _Pending(request, seq, time.perf_counter())
        with self._lock:
            self._groups.setdefault(self._group_key(request, seq), collections.deque()).append(pending)
        return request

    @property
    def num_pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._groups.values())

    def _new_tokens_bucket(self, request: Request) -> int:
        if request.return_audio:
            return request.max_new_tokens
        return next((b for b in self.new_token_buckets if b >= request.max_new_tokens), request.max_new_tokens)

    def _group_key(self, r: Request, seq: int) -> tuple:
        speech = (r.speaker, json.dumps(r.talker, sort_keys=True)) if r.return_audio else None
        if r.stochastic:
            alone = None if self.batch_stochastic else seq
            return (r.use_audio_in_video, r.return_audio, speech, self._new_tokens_bucket(r), "seed", r.seed, alone)
        return (r.use_audio_in_video, r.return_audio, speech, self._new_tokens_bucket(r))

    def _pop_oldest_group(self) -> Optional[tuple]:
        with self._lock:
            live = [(q[0].seq, key) for key, q in self._groups.items() if q]
            for key in [k for k, q in self._groups.items() if not q]:
                del self._groups[key]
            return min(live)[1] if live else None

    def _pop(self, key) -> Optional[_Pending]:
        with self._lock:
            q = self._groups.get(key)
            return q.popleft() if q else None

    def _push_front(self, key, pending: _Pending) -> None:
        with self._lock:
            self._groups.setdefault(key, collections.deque()).appendleft(pending)

    # ------------------------------------------------------------------------------------------ running
    def run(self) -> Iterator[Event]:
        """Serve queued requests (also those submitted while it runs) until the queue is empty."""
        while True:
            key = self._pop_oldest_group()
            if key is None:
                return
            rows: list[_Pending] = []
            while len(rows) < self.max_batch:
                pending = self._pop(key)
                if pending is None:
                    break
                if pending.batch is None:
                    try:
                        self._preprocess(pending)
                    except Exception as err:  # noqa: BLE001 - a bad request fails alone
                        yield Failed(pending.request, _message(err))
                        continue
                if rows and not self._fits(rows + [pending]):
                    self._push_front(key, pending)  # starts the next batch (already preprocessed)
                    break
                rows.append(pending)
            if rows:
                yield from self._run_rows(rows, attempt=1)

    def serve(self, requests: Iterable[Request | Mapping[str, Any]], base_dir: Optional[str] = None
              ) -> Iterator[Event]:
        """Submit `requests` and run: invalid dicts come out as `Failed` events (with a stand-in Request)."""
        for obj in requests:
            try:
                self.submit(obj, base_dir)
            except RequestError as err:
                yield Failed(Request(id=err.request_id, messages=[], line=err.line), str(err))
        yield from self.run()

    def _preprocess(self, pending: _Pending) -> None:
        start = time.perf_counter()
        pending.queue_s = start - pending.submitted
        r = pending.request
        if r.return_audio:
            if not self.has_speech:
                raise ValueError("return_audio: this model has no talker/token2wav, so speech output is not "
                                 "available")
            if r.speaker not in self.speakers:
                raise ValueError(f"unknown speaker {r.speaker!r}; known speakers: {', '.join(self.speakers)}")
        batch = self.processor([r.messages], use_audio_in_video=r.use_audio_in_video, base_dir=r.base_dir)
        prompt_len = int(batch["input_ids"].shape[1])
        if prompt_len + r.max_new_tokens > self.max_positions:
            raise ValueError(f"prompt too long: {prompt_len} prompt tokens + max_new_tokens {r.max_new_tokens} "
                             f"exceed the model's context of {self.max_positions} positions")
        self.model.prepare(batch, r.use_audio_in_video)  # placeholder/feature counts, positions: fail early
        pending.batch, pending.prompt_len = batch, prompt_len
        pending.preprocess_s = time.perf_counter() - start

    def _generation_length(self, rows: Sequence[_Pending]) -> Optional[int]:
        """Decode steps for a batch of rows (their bucket, capped by the context), or None if they don't fit."""
        longest_prompt = max(p.prompt_len for p in rows)
        wanted = max(p.request.max_new_tokens for p in rows)
        steps = min(max(self._new_tokens_bucket(p.request) for p in rows), self.max_positions - longest_prompt)
        return steps if steps >= wanted else None

    def _fits(self, rows: Sequence[_Pending]) -> bool:
        return self._generation_length(rows) is not None

    def _run_rows(self, rows: list[_Pending], attempt: int) -> Iterator[Event]:
        """Generate for `rows`; on failure bisect so that only the requests that fail alone fail."""
        events: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        worker = threading.Thread(target=self._generate, args=(rows, events, attempt), daemon=True)
        worker.start()
        while True:
            kind, value = events.get()
            if kind == "delta":
                yield value
            elif kind == "done":
                yield from value
                break
            else:  # "error"
                worker.join()
                if len(rows) == 1:
                    self._emitted.pop(rows[0].seq, None)
                    yield Failed(rows[0].request, f"generation failed: {_message(value)}", kind="internal")
                else:
                    half = len(rows) // 2
                    yield from self._run_rows(rows[:half], attempt + 1)
                    yield from self._run_rows(rows[half:], attempt + 1)
                return
        worker.join()

    def _generate(self, rows: list[_Pending], events: "queue.Queue", attempt: int) -> None:
        try:
            events.put(("done", self._generate_rows(rows, events, attempt)))
        except Exception as err:  # noqa: BLE001 - reported as an event, then bisected
            events.put(("error", err))

    def _generate_rows(self, rows: list[_Pending], events: "queue.Queue", attempt: int) -> list[Event]:
        requests = [p.request for p in rows]
        first = requests[0]
        steps = self._generation_length(rows)
        assert steps is not None  # batches are formed with _fits
        size = len(rows)
        if not first.return_audio:  # pad to a batch bucket with copies of the last row (outputs dropped)
            size = next((b for b in self.batch_buckets if b >= len(rows)), len(rows))
        size = -(-size // self.row_multiple) * self.row_multiple
        padded = requests + [requests[-1]] * (size - len(rows))
        batch = merge_batches([p.batch for p in rows] + [rows[-1].batch] * (size - len(rows)),
                              self.processor.pad_token_id)
        eos = set(self.eos_ids)
        decoders = [self.tokenizer.stream_decoder(skip_special_tokens=True) for _ in rows]
        fed = [0] * len(rows)  # tokens fed to each row's decoder
        closed = [False] * len(rows)  # row reached its end token or its own max_new_tokens
        streamed = [""] * len(rows)  # text decoded so far in this attempt
        marks: list[float] = []  # times of the on_tokens calls (first = prefill done)

        def on_tokens(step: int, tokens: np.ndarray) -> None:
            marks.append(time.perf_counter())
            if not self.stream:
                return
            for row, request in enumerate(requests):
                if closed[row]:
                    continue
                limit = min(step, request.max_new_tokens)
                piece = []
                for token in tokens[row, fed[row]:limit].tolist():
                    piece.append(decoders[row].put(token))
                    fed[row] += 1
                    if token in eos:
                        closed[row] = True
                        break
                if fed[row] >= request.max_new_tokens:
                    closed[row] = True
                if closed[row]:
                    piece.append(decoders[row].finish())
                streamed[row] += "".join(piece)
                self._emit_delta(rows[row], streamed[row], events)

        chunks = [0] * len(rows)  # audio chunks emitted per row

        def on_audio(row: int, chunk: np.ndarray) -> None:
            if row < len(rows) and requests[row].return_audio:
                events.put(("delta", AudioChunk(requests[row], np.asarray(chunk, np.float32), chunks[row])))
                chunks[row] += 1

        seed = first.seed if first.stochastic else 0
        start = time.perf_counter()
        out = self.model.generate(
            batch, max_new_tokens=steps, return_audio=first.return_audio, speaker=first.speaker,
            eos_token_id=self.eos_ids, chunk_steps=self.stream_every if self.stream else None, on_tokens=on_tokens,
            use_audio_in_video=first.use_audio_in_video, temperature=[r.temperature for r in padded],
            top_k=[r.top_k for r in padded], top_p=[r.top_p for r in padded],
            repetition_penalty=[r.repetition_penalty for r in padded], seed=seed, talker=first.talker,
            on_audio=on_audio if first.return_audio else None)
        end = time.perf_counter()
        prefill_done = marks[0] if marks else end
        thinker_done = marks[-1] if marks else end
        results: list[Event] = []
        for row, (pending, request) in enumerate(zip(rows, requests)):
            ids = [int(t) for t in out.generated[row][: request.max_new_tokens]]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if self.stream:  # flush what the stream has not said yet (normally nothing)
                self._emit_delta(pending, text, events)
            self._emitted.pop(pending.seq, None)
            prefill_s, decode_s = prefill_done - start, thinker_done - prefill_done
            timings = {
                "queue": pending.queue_s, "preprocess": pending.preprocess_s, "prefill": prefill_s,
                "decode": decode_s, "speech": end - thinker_done if request.return_audio else 0.0,
                "total": end - pending.submitted, "new_tokens": len(ids),
                "tokens_per_s": len(ids) / max(prefill_s + decode_s, 1e-9), "batch_size": len(rows),
                "padded_batch_size": size,
                "attempts": attempt,
            }
            audio = out.audio[row] if request.return_audio else None
            if audio is not None and chunks[row] == 0:  # nothing streamed (a reply too short to speak): one chunk
                events.put(("delta", AudioChunk(request, np.asarray(audio, np.float32), 0)))
            results.append(Finished(request, text, ids, "stop" if ids and ids[-1] in eos else "length",
                                    None if audio is None else np.asarray(audio, np.float32), timings))
        return results

    def _emit_delta(self, pending: _Pending, text_so_far: str, events: "queue.Queue") -> None:
        """Queue the part of `text_so_far` not streamed before (also across retries of the request)."""
        done = self._emitted.get(pending.seq, "")
        if len(text_so_far) > len(done):
            self._emitted[pending.seq] = text_so_far
            events.put(("delta", TextDelta(pending.request, text_so_far[len(done):])))


def _message(err: BaseException) -> str:
    """A one-line error message; the processor's "conversation 0, " prefix is dropped (one request = one
    conversation)."""
    text = str(err).strip() or type(err).__name__
    if text.startswith("conversation 0, "):
        text = text[len("conversation 0, "):]
    elif text.startswith("conversation 0: "):
        text = text[len("conversation 0: "):]
    if not isinstance(err, (ValueError, RequestError)):
        text = f"{type(err).__name__}: {text}"
    return text
