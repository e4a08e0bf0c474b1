"""The speech stage of the serving engine: rows whose text has ended and that asked for audio get the talker and
the streaming Token2Wav, one at a time on a background thread, while the engine's thinker slots go on.

A row is spoken as `OmniModel.generate(return_audio=True)` speaks a batch of one with the request's seed: the
talker reads the thinker's prompt embeddings and hidden states (kept by the engine per prefill chunk and decode
step) and the reply's tokens; audio chunks are emitted as Token2Wav makes them (docs/streaming.md).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from types import SimpleNamespace
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from serve.events import AudioChunk, Event, Failed, Finished, error_message

log = logging.getLogger(__name__)


class SpeechStage:
    """Speaks finished rows on a thread (started on first use); `pending` counts the rows not yet done.

    Args:
      model: the `OmniModel` (with `speech`).
      emit: called with each event (AudioChunk, then Finished or Failed), from the speech thread.
      on_done: called (from the speech thread) after each row, once `pending` has dropped.
      max_audio_tokens: most talker codec tokens of a reply (None: the request's / the model's limit).
      eos_ids: the thinker's end token ids (where the talker's reply stream ends).
    """

    def __init__(self, model, emit: Callable[[Event], None], on_done: Callable[[], None],
                 max_audio_tokens: Optional[int], eos_ids):
        self.model = model
        self.emit = emit
        self.on_done = on_done
        self.max_audio_tokens = max_audio_tokens
        self.eos_ids = sorted(eos_ids)
        self.pending = 0
        self._lock = threading.Lock()
        self._jobs: "queue.Queue[tuple]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, row, reason: str, timings: dict) -> None:
        """Speak `row` (an engine row whose text ended with `reason`); its Finished event carries `timings`."""
        with self._lock:
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="omni-jax-speech", daemon=True)
                self._thread.start()
        self._jobs.put((row, reason, timings))

    def _loop(self) -> None:
        while True:
            row, reason, timings = self._jobs.get()
            try:
                audio = self.speak(row)
                now = time.perf_counter()
                timings["speech"] = now - row.submitted - timings["total"]
                timings["total"] = now - row.submitted
                self.emit(Finished(row.request, row.text, list(row.tokens), reason, audio, timings))
            except Exception as err:  # noqa: BLE001 - the request fails alone
                log.exception("speech failed for %s", row.request.id)
                self.emit(Failed(row.request, f"speech failed: {error_message(err)}", kind="internal"))
            finally:
                with self._lock:
                    self.pending -= 1
                self.on_done()

    def speak(self, row) -> np.ndarray:
        """Talker + streamed Token2Wav for one finished row; returns the whole float32 24 kHz waveform."""
        from omni_jax.streaming import StreamingToken2Wav, TalkerAudioStream
        from omni_jax.voices import resolve_voice

        model, request = self.model, row.request
        if len(row.tokens) < 2:
            raise ValueError("speech needs at least 2 generated thinker tokens (the talker consumes the reply one "
                             "token behind)")
        voice = resolve_voice(model.speech.speakers, request.speaker)
        length = row.prompt_len
        prefill_out = SimpleNamespace(inputs_embeds=row.embeds[:, :length],
                                      hidden_states=jnp.concatenate(row.prefill_hidden, axis=0)[None, :length])
        # hidden[k] = the hidden state of the step fed token k; the last token is never fed (its entry is unread)
        num = len(row.tokens)
        fed = [h[None] for h in row.hidden]
        dim = prefill_out.hidden_states.shape[-1]
        hidden = jnp.concatenate(fed + [jnp.zeros((num - len(fed), dim), prefill_out.hidden_states.dtype)])[None]
        state = SimpleNamespace(tokens=jnp.asarray([row.tokens], jnp.int32), hidden=hidden, step=num)
        index = [0]

        def on_audio(_, chunk):
            self.emit(AudioChunk(request, np.asarray(chunk, np.float32), index[0]))
            index[0] += 1

        stream = TalkerAudioStream(StreamingToken2Wav(model.speech, voice, rows=1, seed=request.seed), on_audio)
        settings = dict(request.talker or {})
        if self.max_audio_tokens:
            settings["max_new_tokens"] = min(int(settings.get("max_new_tokens", self.max_audio_tokens)),
                                             self.max_audio_tokens)
        model._talk(row.prepared.inputs, state, prefill_out, voice, self.eos_ids, request.seed, settings,
                    on_codes=stream)
        audio = np.asarray(stream.close()[0], np.float32)
        if index[0] == 0:  # a reply too short to stream: one chunk
            self.emit(AudioChunk(request, audio, 0))
        return audio
