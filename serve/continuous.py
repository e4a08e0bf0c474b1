"""The serving engine: continuous batching over a paged KV cache, with chunked prefill and speech.

    engine = ContinuousEngine(model, processor, max_slots=16)
    for event in engine.serve(requests):          # dicts or serve.requests.Request; runs until all are done
        if isinstance(event, TextDelta): ...      # text as it is made
        elif isinstance(event, AudioChunk): ...   # speech as it is made (return_audio requests)
        elif isinstance(event, Finished): ...     # text, token_ids, finish_reason, audio, timings
        elif isinstance(event, Failed): ...       # error, kind: "invalid" (the request) / "internal" / "cancelled"

The HTTP server (`serve.http`) drives the same engine from a background thread (`start`, `submit`, `cancel`).

How it runs. The engine has `max_slots` decode slots. Every `step`:
  1. admits waiting requests into free slots (oldest first); a request's prompt embeddings (with its media
     encoded) are computed once, on admission;
  2. prefills: the admitted prompts are written into their slots' pages in chunks of at most `chunk_size`
     tokens, at most `prefill_budget` tokens per step, so a 30k-token video prompt is spread over many steps
     while the other rows keep decoding;
  3. decodes one token for every slot (`omni_jax.paged_generation.PagedPrograms.decode_step`, one compiled
     program whatever the occupancy; idle slots write the scratch page);
  4. ends rows at an end token (the model's or the request's `stop_token_ids`), a `stop` string (cut from the
     text, not included), `max_new_tokens`, or the context (`max_model_len`); their slots and pages are free at
     once for the next step.
A request's tokens depend only on the request and its seed (per-request PRNG keys, rows that never mix), so the
same request gives the same reply whatever else is being served.

Pages. Each slot's page table grows a page at a time (`serve.pages.PageAllocator`), so the cache holds the tokens
that exist, not slots x max length. When a step needs a page and none is free, the newest decoding row is
preempted: its pages are freed and it starts over later from its prompt. It reproduces the same tokens (see above),
and the text it had already streamed is not sent twice.

Speech. A row that asked for audio decodes its text among the others, keeping its hidden states; when it ends,
`serve.speech_stage` runs the talker and the streaming Token2Wav for it on a thread, emitting audio chunks as they
are made, while the thinker slots go on. Talker rows run one at a time (see docs/serving.md).

Timings (seconds) in `Finished.timings`: queue (submit -> admitted), preprocess (processor on the request),
prefill (admitted -> first token: embedding, all prefill chunks, waiting for other work), ttft (submit -> first
token), decode (first -> last token), speech (talker + Token2Wav), total, new_tokens, tokens_per_s (new tokens per
second of prefill + decode), preemptions.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from omni_jax.generation import bucket_length
from omni_jax.models.kv_cache import PagedKVCache
from omni_jax.paged_generation import PagedPrograms, sampling_rows
from serve.events import AudioChunk, Event, Failed, Finished, TextDelta, error_message as _message
from serve.pages import OutOfPages, PageAllocator
from serve.speech_stage import SpeechStage
from serve.requests import Request, RequestError, parse_request

__all__ = ["ContinuousEngine", "PreparedRequest", "TextDelta", "AudioChunk", "Finished", "Failed", "Event"]

log = logging.getLogger(__name__)

MIN_CHUNK = 16  # smallest prefill chunk bucket
MIN_PAGE_BUCKET = 4  # smallest decode page-table width (XLA path)


@dataclasses.dataclass
class PreparedRequest:
    """A request's host-side inputs: what the processor made of it, checked against the model and the context."""

    request: Request
    inputs: Any  # omni_jax.model_inputs.ThinkerInputs of the single conversation, unpadded [1, T]
    prompt_len: int
    preprocess_s: float


@dataclasses.dataclass
class _Row:
    """A request from submission to its end (in a slot while admitted)."""

    request: Request
    seq: int
    submitted: float
    prepared: Optional[PreparedRequest] = None
    key_data: Optional[np.ndarray] = None  # [2] uint32: raw key of jax.random.key(seed)
    slot: Optional[int] = None
    admitted_at: float = 0.0
    embeds: Any = None  # [1, T_bucket, D] device array (kept across preemptions)
    prompt_seen: Any = None  # [1, V] device bool
    prefilled: int = 0  # prompt tokens written
    pages: list = dataclasses.field(default_factory=list)
    tokens: list = dataclasses.field(default_factory=list)  # generated ids
    text: str = ""
    decoder: Any = None
    emitted: int = 0  # characters of text already sent (kept across preemptions)
    first_token_at: float = 0.0
    prefill_hidden: list = dataclasses.field(default_factory=list)  # speech rows: [n, D] device per chunk
    hidden: list = dataclasses.field(default_factory=list)  # speech rows: [D] device per fed generated token
    preemptions: int = 0

    @property
    def prompt_len(self) -> int:
        return self.prepared.prompt_len

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len and bool(self.tokens)

    @property
    def length(self) -> int:
        """Tokens in the row's cache (the prompt written so far, then one per fed generated token)."""
        return self.prefilled + max(len(self.tokens) - 1, 0)


class ContinuousEngine:
    """Continuous batching over a paged KV cache (module docstring).

    Args:
      model: an `omni_jax.OmniModel` (unrolled layers: `scan_layers=False`, the serving default).
      processor: an `omni_jax.Processor`.
      max_slots: decode slots (rows of the decode step); rounded up to the mesh's row multiple.
      page_size: token slots per page.
      kv_pages: pages in the pool (all shards; default: every slot can hold `max_model_len` tokens).
      max_model_len: longest prompt + reply (default: the model's context).
      chunk_size: most prompt tokens of one prefill call; prompt chunks are bucketed to powers of two from 16.
      prefill_budget: most prompt tokens prefilled per step (default: chunk_size).
      eos_token_id: end token(s) (default: the model's).
      max_audio_tokens: most talker codec tokens of a spoken reply (50 per second; default: the release's 4096);
        a request's own `talker.max_new_tokens` may ask for fewer.
    """

    def __init__(self, model, processor, max_slots: int = 16, page_size: int = 16, kv_pages: Optional[int] = None,
                 max_model_len: Optional[int] = None, chunk_size: int = 512, prefill_budget: Optional[int] = None,
                 eos_token_id=None, max_audio_tokens: Optional[int] = None):
        if model.options.scan_layers:
            raise ValueError("the continuous engine needs a model loaded with scan_layers=False (unrolled layers)")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.programs = PagedPrograms(model)
        text = model.config.thinker.text
        self.context = int(text.max_position_embeddings)
        self.max_model_len = min(int(max_model_len or self.context), self.context)
        mesh = model.mesh
        self.num_shards = 1 if mesh is None else int(np.prod([mesh.shape.get(a, 1) for a in ("data", "fsdp")]))
        self.max_slots = -(-int(max_slots) // self.num_shards) * self.num_shards
        self.slots_per_shard = self.max_slots // self.num_shards
        self.page_size = int(page_size)
        self.chunk_size = max(MIN_CHUNK, int(chunk_size))
        self.prefill_budget = int(prefill_budget or self.chunk_size)
        self.max_pages_per_row = -(-self.max_model_len // self.page_size)
        total = int(kv_pages or self.max_slots * self.max_pages_per_row + self.num_shards)
        pages_per_shard = -(-total // self.num_shards)
        self.allocator = PageAllocator(pages_per_shard, self.page_size, self.num_shards)
        self.platform = model.options.platform
        self.fixed_page_table = self.platform == "tpu"
        eos = eos_token_id if eos_token_id is not None else model._eos_ids(None)
        self.eos_ids = frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple, set, frozenset)) else [eos]))
        speech = getattr(model, "speech", None)
        self.has_speech = speech is not None
        self.max_audio_tokens = max_audio_tokens
        self.speakers = sorted(speech.speakers) if speech is not None else []
        self._pages = self._new_pages()
        self._seen = self._zeros((self.max_slots, text.vocab_size), bool)
        self._slots: list[Optional[_Row]] = [None] * self.max_slots
        self._waiting: "collections.deque[_Row]" = collections.deque()
        self._seq = itertools.count()
        self._lock = threading.RLock()
        self._cancelled: set[int] = set()
        self._events: "queue.Queue[Event]" = queue.Queue()
        self._sampling_cache: dict[tuple, Any] = {}
        # compiled shapes, for callers that check that bucketing keeps them few
        self.prefill_shapes: set[int] = set()
        self.decode_shapes: set[int] = set()
        self.embed_shapes: set[tuple] = set()
        self.stats = collections.Counter()
        self.peak_pages = 0
        self.page_samples: list[tuple[int, int]] = []  # (pages in use, tokens held) after each decode step
        # background loop (start / stop)
        self._wake = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._drain = True
        self._on_event: Optional[Callable[[Event], None]] = None
        self._speech = SpeechStage(model, self._emit, self._speech_done, max_audio_tokens, self.eos_ids)

    # ------------------------------------------------------------------------------------------ setup
    def _pool_sharding(self):
        mesh = self.model.mesh
        if mesh is None:
            return None
        from omni_jax.kernels.pallas_attention import shard_axes
        from omni_jax.sharding import rules_context

        text = self.model.config.thinker.text
        with jax.set_mesh(mesh), rules_context():
            batch_axes, head_axes = shard_axes(mesh.abstract_mesh, self.allocator.num_pages, text.num_key_value_heads)
        return NamedSharding(mesh, PartitionSpec(batch_axes, None, head_axes, None))

    def _new_pages(self) -> tuple:
        text = self.model.config.thinker.text

        def init():
            return PagedKVCache.init_pages(text.num_hidden_layers, self.allocator.num_pages, self.page_size,
                                           text.num_key_value_heads, text.head_dim,
                                           jnp.dtype(self.model.options.dtype), platform=self.platform)

        sharding = self._pool_sharding()
        if sharding is None:
            return init()
        return jax.jit(init, out_shardings=(sharding,) * text.num_hidden_layers)()  # made in place, never on host

    # Host <-> device. Under a mesh every array is a global one (the same host values on every process of a
    # multi-host run, each feeding its own devices), and results are gathered from all processes.
    def _put(self, x):
        x = np.asarray(x)
        mesh = self.model.mesh
        if mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda index: x[index])

    def _zeros(self, shape, dtype):
        mesh = self.model.mesh
        if mesh is None:
            return jnp.zeros(shape, dtype)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(mesh, PartitionSpec()))()

    @staticmethod
    def _host(x) -> np.ndarray:
        from omni_jax.api import _to_host

        return _to_host(x)

    # ------------------------------------------------------------------------------------------ requests
    def parse(self, obj: Mapping[str, Any], base_dir: Optional[str] = None) -> Request:
        """Validate a request dict against this model (speakers, speech); raises RequestError."""
        return parse_request(obj, base_dir=base_dir, speakers=self.speakers, has_speech=self.has_speech)

    def prepare(self, request: Request) -> PreparedRequest:
        """Host work of a request (processor, positions, encoder plans) with every check that needs it: unreadable
        media, placeholder counts, the prompt against `max_model_len`. Raises ValueError naming the problem."""
        start = time.perf_counter()
        if request.return_audio:
            if not self.has_speech:
                raise ValueError("return_audio: this model has no talker/token2wav, so speech output is not "
                                 "available")
            if request.speaker not in self.speakers:
                raise ValueError(f"unknown speaker {request.speaker!r}; known speakers: {', '.join(self.speakers)}")
        batch = self.processor([request.messages], use_audio_in_video=request.use_audio_in_video,
                               base_dir=request.base_dir)
        prompt_len = int(batch["input_ids"].shape[1])
        if prompt_len + request.max_new_tokens > self.max_model_len:
            raise ValueError(f"prompt too long: {prompt_len} prompt tokens + max_new_tokens "
                             f"{request.max_new_tokens} exceed the context of {self.max_model_len} positions")
        inputs = self.model.prepare(batch, request.use_audio_in_video)
        return PreparedRequest(request, inputs, prompt_len, time.perf_counter() - start)

    def submit(self, request: Request | Mapping[str, Any], base_dir: Optional[str] = None,
               prepared: Optional[PreparedRequest] = None) -> int:
        """Queue a request (RequestError if a dict is invalid); returns its ticket (for `cancel`). A request
        whose preparation fails later gets a `Failed` event of kind "invalid"."""
        if not isinstance(request, Request):
            request = self.parse(request, base_dir)
        row = _Row(request, next(self._seq), time.perf_counter(), prepared=prepared)
        row.key_data = np.asarray(jax.random.key_data(jax.random.key(request.seed)), np.uint32)
        with self._lock:
            self._waiting.append(row)
            self._wake.notify_all()
        return row.seq

    def cancel(self, ticket: int) -> None:
        """Stop a request (a client went away): its slot and pages are freed at the next step."""
        with self._lock:
            self._cancelled.add(ticket)
            self._wake.notify_all()

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting) or any(r is not None for r in self._slots) or self._speech.pending > 0

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self._slots)

    def tokens_held(self) -> int:
        return sum(r.length for r in self._slots if r is not None)

    # ------------------------------------------------------------------------------------------ driving
    def serve(self, requests: Iterable[Request | Mapping[str, Any]], base_dir: Optional[str] = None
              ) -> Iterator[Event]:
        """Submit `requests` and run until all are done; invalid dicts come out as `Failed` events."""
        for obj in requests:
            try:
                self.submit(obj, base_dir)
            except RequestError as err:
                yield Failed(Request(id=err.request_id, messages=[], line=err.line), str(err))
        yield from self.run()

    def run(self) -> Iterator[Event]:
        """Step until every submitted request has ended (also those submitted meanwhile), yielding events."""
        while True:
            busy = self.has_work
            if not busy and self._events.empty():
                return
            if any(r is not None for r in self._slots) or self._waiting:
                self.step()
            else:
                time.sleep(0.005)  # only speech jobs left
            while not self._events.empty():
                yield self._events.get()

    def start(self, on_event: Callable[[Event], None]) -> None:
        """Run the engine in a background thread, calling `on_event` (from that thread) for every event."""
        self._on_event = on_event
        self._thread = threading.Thread(target=self._loop, name="omni-jax-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop the background loop; with `drain`, after the requests already submitted have ended."""
        with self._lock:
            self._stopping = True
            self._drain = drain
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            self._dispatch()  # before any wait: the speech thread may have queued a request's last event
            with self._lock:
                if self._stopping and (not self._drain or not self.has_work):
                    break
                if not self.has_work:
                    self._wake.wait(timeout=0.05)
                    continue
            if any(r is not None for r in self._slots) or self._waiting or self._cancelled:
                self.step()
            else:
                time.sleep(0.005)  # only speech jobs in flight
        self._dispatch()

    def _dispatch(self) -> None:
        while not self._events.empty():
            event = self._events.get()
            if self._on_event is not None:
                try:
                    self._on_event(event)
                except Exception:  # noqa: BLE001 - a listener must not stop the engine
                    log.exception("event listener failed")

    def _emit(self, event: Event) -> None:
        self._events.put(event)

    def _speech_done(self) -> None:
        with self._lock:
            self._wake.notify_all()

    # ------------------------------------------------------------------------------------------ one step
    def step(self) -> None:
        """Admit, prefill (within the budget), and decode one token for every decoding row."""
        self._apply_cancellations()
        self._admit()
        self._prefill()
        self._decode()

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            kept = collections.deque()
            for row in self._waiting:
                if row.seq in cancelled:
                    self._emit(Failed(row.request, "cancelled", kind="cancelled"))
                else:
                    kept.append(row)
            self._waiting = kept
        for row in list(self._slots):
            if row is not None and row.seq in cancelled:
                self._release(row)
                self._emit(Failed(row.request, "cancelled", kind="cancelled"))

    def _free_slot(self) -> Optional[int]:
        """A free slot in the shard with the most free pages (None if no slot, or no page, is free)."""
        best = None
        for shard in range(self.num_shards):
            free_pages = self.allocator.free_pages(shard)
            if free_pages == 0:
                continue
            for s in range(shard * self.slots_per_shard, (shard + 1) * self.slots_per_shard):
                if self._slots[s] is None:
                    if best is None or free_pages > best[0]:
                        best = (free_pages, s)
                    break
        return None if best is None else best[1]

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                slot = self._free_slot()
                if slot is None:
                    return
                row = self._waiting.popleft()
            try:
                if row.prepared is None:
                    row.prepared = self.prepare(row.request)
                if row.embeds is None:
                    self._embed(row)
            except Exception as err:  # noqa: BLE001 - a bad request fails alone
                kind = "invalid" if isinstance(err, (ValueError, RequestError, OSError)) else "internal"
                self._emit(Failed(row.request, _message(err), kind=kind))
                continue
            row.slot = slot
            row.admitted_at = time.perf_counter()
            row.decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
            self._slots[slot] = row

    def _embed(self, row: _Row) -> None:
        inputs = row.prepared.inputs
        length = bucket_length(row.prompt_len)
        ids = np.full((1, length), self.model._pad_id(None), np.int32)
        ids[:, : row.prompt_len] = inputs.input_ids
        multimodal = {k: None if v is None else jax.tree_util.tree_map(self._put, v)
                      for k, v in (("audio", inputs.audio), ("image", inputs.image), ("video", inputs.video))}
        shape = (length,) + tuple((k, tuple(np.shape(x) for x in jax.tree_util.tree_leaves(v)))
                                  for k, v in multimodal.items() if v is not None)
        self.embed_shapes.add(shape)
        valid = (np.arange(length) < row.prompt_len)[None]
        with self.model._mesh_context():
            row.embeds = self.programs.embed(self.model.params["thinker"], self._put(ids), multimodal)
            row.prompt_seen = self.programs.prompt_seen(self._put(ids), self._put(valid))

    def _shard_of(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def _prefill(self) -> None:
        budget = self.prefill_budget
        rows = sorted((r for r in self._slots if r is not None and r.prefilled < r.prompt_len),
                      key=lambda r: r.admitted_at)
        for row in rows:
            if budget <= 0:
                return
            if row.slot is None:  # preempted by an earlier row's growth in this loop
                continue
            n = min(self.chunk_size, row.prompt_len - row.prefilled, budget)
            if not self._grow(row, row.prefilled + n):
                continue
            try:
                self._prefill_chunk(row, n)
            except Exception as err:  # noqa: BLE001 - the request fails alone
                log.exception("prefill failed for %s", row.request.id)
                self._release(row)
                self._emit(Failed(row.request, f"generation failed: {_message(err)}", kind="internal"))
                self._reset_device_state_if_lost()
                continue
            budget -= n

    def _prefill_chunk(self, row: _Row, n: int) -> None:
        chunk = min(max(MIN_CHUNK, 1 << (n - 1).bit_length()), self.chunk_size)
        rows = self.num_shards  # one real row, at its shard's index
        r = self._shard_of(row.slot)
        start = row.prefilled
        with self.model._mesh_context():
            embeds = self.programs.chunk_embeds(row.embeds, self._put(np.int32(start)), self._put(np.int32(r)),
                                                rows=rows, chunk=chunk)
        positions = np.zeros((3, rows, chunk), np.int32)
        positions[:, r, :n] = row.prepared.inputs.positions[:, 0, start:start + n]
        widths = self._page_width([row])
        table = np.zeros((rows, widths), np.int32)
        table[r, : len(row.pages)] = row.pages
        lengths = np.zeros((rows,), np.int32)
        lengths[r] = start
        q_lens = np.zeros((rows,), np.int32)
        q_lens[r] = n
        sampling = self._sampling([None] * r + [row.request], rows)
        key_data = np.zeros((rows, 2), np.uint32)
        key_data[r] = row.key_data
        self.prefill_shapes.add(chunk)
        with self.model._mesh_context():
            token, self._pages, hidden = self.programs.prefill_chunk(
                self.model.params["thinker"], self._pages, embeds, self._put(positions), self._put(table),
                self._put(lengths), self._put(q_lens), sampling, self._put(key_data), row.prompt_seen,
                self._put(np.int32(r)))
        if row.request.return_audio:
            row.prefill_hidden.append(hidden[r, :n])
        row.prefilled += n
        self.stats["prefill_tokens"] += n
        if row.prefilled == row.prompt_len:
            first = int(self._host(token)[r])
            with self.model._mesh_context():
                self._seen = self.programs.set_seen_rows(self._seen, self._put(np.asarray([row.slot], np.int32)),
                                                         row.prompt_seen, self._put(np.asarray([first], np.int32)))
            row.first_token_at = time.perf_counter()
            self._accept(row, first)

    def _page_width(self, rows) -> int:
        """Page-table width of a call: fixed on TPU (the kernel reads only the pages a row holds); on the XLA path,
        where each row's pages are gathered, the next power of two of the widest row (a few compiled shapes)."""
        if self.fixed_page_table:
            return self.max_pages_per_row
        widest = max(len(r.pages) for r in rows)
        return min(max(MIN_PAGE_BUCKET, 1 << max(widest - 1, 0).bit_length()), self.max_pages_per_row)

    def _sampling(self, requests, rows: int):
        key = tuple(None if r is None else (r.temperature, r.top_k, r.top_p, r.repetition_penalty)
                    for r in requests) + ((None,) * (rows - len(requests)))
        if key not in self._sampling_cache:
            if len(self._sampling_cache) > 256:
                self._sampling_cache.clear()
            greedy = Request(id="-", messages=[])
            params = sampling_rows([greedy if r is None else r for r in requests], rows)
            self._sampling_cache[key] = jax.tree_util.tree_map(lambda a: self._put(np.asarray(a)), params)
        return self._sampling_cache[key]

    def _decode(self) -> None:
        rows = [r for r in self._slots if r is not None and r.decoding]
        for row in list(rows):
            if row.slot is not None:
                self._grow(row, row.length + 1)
        rows = [r for r in self._slots if r is not None and r.decoding]
        if not rows:
            return
        s = self.max_slots
        width = self._page_width(rows)
        tokens = np.zeros((s,), np.int32)
        positions = np.zeros((s,), np.int32)
        lengths = np.zeros((s,), np.int32)
        counts = np.zeros((s,), np.int32)
        active = np.zeros((s,), bool)
        table = np.zeros((s, width), np.int32)
        key_data = np.zeros((s, 2), np.uint32)
        requests: list = [None] * s
        for row in rows:
            i = row.slot
            tokens[i] = row.tokens[-1]
            positions[i] = int(row.prepared.inputs.next_positions[0]) + len(row.tokens) - 1
            lengths[i] = row.length
            counts[i] = len(row.tokens)
            active[i] = True
            table[i, : len(row.pages)] = row.pages
            key_data[i] = row.key_data
            requests[i] = row.request
        self.decode_shapes.add(width)
        try:
            with self.model._mesh_context():
                out, self._pages, self._seen, hidden = self.programs.decode_step(
                    self.model.params["thinker"], self._pages, self._put(tokens), self._put(positions),
                    self._put(table), self._put(lengths), self._put(active), self._sampling(requests, s),
                    self._put(key_data), self._seen, self._put(counts))
            out = self._host(out)
        except Exception as err:  # noqa: BLE001 - the step's rows cannot be told apart: all of them fail
            log.exception("decode step failed")
            for row in rows:
                self._release(row)
                self._emit(Failed(row.request, f"generation failed: {_message(err)}", kind="internal"))
            self._reset_device_state_if_lost()
            return
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        for row in rows:
            if row.request.return_audio:
                row.hidden.append(hidden[row.slot])
            self._accept(row, int(out[row.slot]))
        held = self.tokens_held()
        self.page_samples.append((self.allocator.pages_in_use, held))
        self.peak_pages = max(self.peak_pages, self.allocator.pages_in_use)

    def _reset_device_state_if_lost(self) -> None:
        """After a failed call whose donated buffers are gone, start over with empty pages (rows in flight are
        failed by the caller or restarted here)."""
        if not any(p.is_deleted() for p in self._pages) and not self._seen.is_deleted():
            return
        for row in list(self._slots):
            if row is not None:
                self._preempt(row)
        self._pages = self._new_pages()
        self._seen = self._zeros(self._seen.shape, bool)

    # ------------------------------------------------------------------------------------------ rows
    def _accept(self, row: _Row, token: int) -> None:
        """Record a generated token; end the row when a stop condition holds; stream new text."""
        row.tokens.append(token)
        request = row.request
        reason = None
        if token in self.eos_ids or token in request.stop_token_ids:
            reason = "stop"
            row.text += row.decoder.finish()
        else:
            row.text += row.decoder.put(token)
        if request.stop:
            cut = min((i for i in (row.text.find(s) for s in request.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, reason = row.text[:cut], "stop"
        if reason is None and (len(row.tokens) >= request.max_new_tokens
                               or row.prompt_len + len(row.tokens) >= self.max_model_len):
            reason = "length"
            row.text += row.decoder.finish()
        if reason is None and request.stop:  # hold back what could be the start of a stop string
            hold = max(len(s) for s in request.stop) - 1
            visible = len(row.text) - hold
        else:
            visible = len(row.text)
        if visible > row.emitted:
            self._emit(TextDelta(request, row.text[row.emitted:visible]))
            row.emitted = visible
        if reason is not None:
            self._finish(row, reason)

    def _release(self, row: _Row) -> None:
        if row.slot is not None:
            self.allocator.release(self._shard_of(row.slot), row.pages)
            self._slots[row.slot] = None
            row.slot = None

    def _preempt(self, row: _Row) -> None:
        """Free a row's slot and pages; it starts over from its prompt later (same tokens, text not re-sent)."""
        self._release(row)
        row.prefilled, row.tokens, row.text = 0, [], ""
        row.prefill_hidden, row.hidden = [], []
        row.preemptions += 1
        self.stats["preemptions"] += 1
        with self._lock:
            self._waiting.appendleft(row)

    def _grow(self, row: _Row, tokens: int) -> bool:
        """Give `row` pages for `tokens` tokens, preempting the newest other rows of its shard while its part of the
        pool is full. False when the row cannot grow: it is then preempted itself if it is not alone, else failed
        (the pool cannot hold this request at all)."""
        shard = self._shard_of(row.slot)
        while True:
            try:
                self.allocator.grow(shard, row.pages, tokens)
                return True
            except OutOfPages:
                others = [r for r in self._slots
                          if r is not None and r is not row and self._shard_of(r.slot) == shard]
                newer = [r for r in others if r.admitted_at > row.admitted_at]
                if newer:
                    self._preempt(max(newer, key=lambda r: r.admitted_at))
                elif others:
                    self._preempt(row)
                    return False
                else:
                    self._release(row)
                    self._emit(Failed(row.request, f"the KV cache pool ({self.allocator.pages_per_shard - 1} pages "
                                      f"of {self.page_size} tokens per shard) cannot hold this request's {tokens} "
                                      "tokens; raise kv_pages", kind="internal"))
                    return False

    def _finish(self, row: _Row, reason: str) -> None:
        end = time.perf_counter()
        self._release(row)
        first = row.first_token_at or end
        timings = {
            "queue": row.admitted_at - row.submitted, "preprocess": row.prepared.preprocess_s,
            "prefill": first - row.admitted_at, "ttft": first - row.submitted, "decode": end - first,
            "speech": 0.0, "total": end - row.submitted, "new_tokens": len(row.tokens),
            "tokens_per_s": len(row.tokens) / max(end - row.admitted_at, 1e-9), "preemptions": row.preemptions,
        }
        if row.request.return_audio:
            self._speech.submit(row, reason, timings)
            return
        self._emit(Finished(row.request, row.text, list(row.tokens), reason, None, timings))
