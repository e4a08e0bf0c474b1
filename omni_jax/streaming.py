"""Streaming Token2Wav: codec tokens in as the talker makes them, 24 kHz audio chunks out (released chunking).

The released streaming code of Qwen2.5-Omni (Qwen's `Qwen2Code2wav.process_chunk`, kept in vLLM-Omni's
token2wav) cuts the mel timeline into chunks of 3 DiT blocks and runs the flow-matching ODE on a window with
2 blocks of look-back and 1 block of look-ahead context; BigVGAN then vocodes each chunk with 20 mel frames of
overlap on each side. In mel frames (bs = 24 = DiT block_size, 2 mel frames per codec token, 240 samples/frame):

    chunk k owns frames [72k, 72k + 72)
    DiT window   [max(72k − 48, 0), 72k + 72 + 24)      (≤ 144 frames = 72 codec tokens; the last: up to the end)
    audio out    k = 0: frames [0, 52)   k ≥ 1: [72k − 20, 72k + 52)   last: [72k − 20, end)
    vocoder in   k = 0: [0, 72)   k ≥ 1 and last: the 135 frames before the chunk end (release: from 72k − 40)

So the first chunk needs 48 codec tokens (96 mel frames: 3 blocks + 1 look-ahead block) and holds 52 frames
= 520 ms = 12480 samples; every further chunk needs 36 more tokens and holds 72 frames = 720 ms = 17280
samples; `finish()` emits the rest. An utterance shorter than 48 tokens is synthesised whole by `finish()`.

Shapes are static: every DiT window is padded to 144 frames with a frame mask (padded frames are not attended,
so padding changes nothing), and the vocoder sees 72 or 135 frames (an utterance shorter than 135 frames is
vocoded whole at its own length when it finishes). Noise is fixed per position (`speech.position_noise`, or the
caller's full noise array), so a stream is reproducible and starts from the same state as
`SpeechModel.token2wav` with the same seed/noise.

Streamed ≠ whole-utterance synthesis exactly: the DiT window is bounded, so the context blocks' ODE states
differ from the whole-utterance run and the difference reaches the chunk through the 36 DiT calls; the
vocoder sees 20 frames of context where its receptive field is a little larger. docs/streaming.md and
tests/test_streaming.py quantify it.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.speech import SpeechModel, check_codes, position_noise, sample_masked_mel
from omni_jax.voices import Voice, resolve_voice

__all__ = ["StreamLayout", "StreamingToken2Wav", "TalkerAudioStream", "window_mel"]


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """The released chunking, in DiT blocks / mel frames (Qwen2Code2wav: bs_mel 24, batched_chunk 3,
    past_cache_size 48, future_cache_size 24, future_size 20)."""

    block_size: int = 24  # mel frames per DiT block (config.block_size)
    repeats: int = 2  # mel frames per codec token (config.repeats)
    chunk_blocks: int = 3  # blocks per chunk
    past_blocks: int = 2  # DiT look-back context
    future_blocks: int = 1  # DiT look-ahead context
    vocoder_overlap: int = 20  # mel frames of BigVGAN context on each side of a chunk boundary

    def __post_init__(self):
        if self.block_size % self.repeats:
            raise ValueError(f"block_size {self.block_size} must be a multiple of repeats {self.repeats}")
        if min(self.chunk_blocks, self.block_size, self.repeats) < 1 or min(self.past_blocks, self.future_blocks) < 0:
            raise ValueError(f"invalid stream layout {self}")
        if 2 * self.vocoder_overlap > self.chunk:
            raise ValueError(f"vocoder_overlap {self.vocoder_overlap} must be at most half a chunk ({self.chunk})")

    @classmethod
    def for_config(cls, dit_config, **overrides) -> "StreamLayout":
        return cls(block_size=dit_config.block_size, repeats=dit_config.repeats, **overrides)

    @property
    def chunk(self) -> int:  # mel frames per chunk (72)
        return self.chunk_blocks * self.block_size

    @property
    def past(self) -> int:  # 48
        return self.past_blocks * self.block_size

    @property
    def future(self) -> int:  # 24
        return self.future_blocks * self.block_size

    @property
    def window(self) -> int:  # DiT window, mel frames (144)
        return self.past + self.chunk + self.future

    @property
    def vocoder_window(self) -> int:  # 135 mel frames: 2·overlap + the longest last chunk (chunk + future − 1)
        return 2 * self.vocoder_overlap + self.chunk + self.future - 1

    @property
    def first_chunk_tokens(self) -> int:
        """Codec tokens needed before the first chunk (48 in the release)."""
        return (self.chunk + self.future) // self.repeats

    @property
    def chunk_tokens(self) -> int:
        """Further codec tokens per chunk after the first (36)."""
        return self.chunk // self.repeats


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("num_steps", "guidance_scale", "sway_coefficient"))
def window_mel(dit_config, dit_options, params, codes, cond, ref_mel, noise, frame_mask, *, num_steps: int = 10,
               guidance_scale: float = 0.5, sway_coefficient: float | None = -1.0) -> jax.Array:
    """`speech.sample_masked_mel` on padded DiT windows, as [B, W, mel] (padded frames are garbage)."""
    mel = sample_masked_mel(dit_config, dit_options, params, codes, cond, ref_mel, noise, frame_mask,
                            num_steps=num_steps, guidance_scale=guidance_scale, sway_coefficient=sway_coefficient)
    return jnp.transpose(mel, (0, 2, 1))  # [B, W, mel]


@dataclasses.dataclass
class _Row:
    codes: list  # codec ids received so far (python ints)
    voice: Voice
    key: Optional[jax.Array]  # position-noise key (None when the caller gave noise)
    noise: Optional[np.ndarray]  # [frames, mel] caller's noise, or None
    mel: list = dataclasses.field(default_factory=list)  # DiT output per finished chunk, each [frames, mel]
    next_chunk: int = 0
    finished: bool = False  # no more codes will come
    done: bool = False  # the last chunk has been emitted
    samples_out: int = 0


class StreamingToken2Wav:
    """Chunked Token2Wav for `rows` independent streams (one batched DiT call per round of ready chunks).

        stream = StreamingToken2Wav(speech, voice, seed=0)
        for codes in talker_output:            # any number of codes per push
            for chunk in stream.push(codes):   # float32 [samples] at 24 kHz, in order
                play(chunk)
        for chunk in stream.finish():
            play(chunk)

    With rows > 1 use `push_rows([codes_row0, codes_row1, ...])` / `finish_rows()`, which return one list of
    chunks per row. `voice` is one Voice for every row or one per row; `noise` (optional) is one [frames, mel]
    array per row covering the whole utterance; otherwise row r draws `position_noise` from key(seed + r).
    `on_mel(row, first_frame, mel [frames, mel])`, if given, sees each chunk's DiT output.
    """

    def __init__(self, speech: SpeechModel, voice, rows: int = 1, seed: int = 0, noise=None, num_steps: int = 10,
                 guidance_scale: float = 0.5, sway_coefficient: float = -1.0, layout: StreamLayout | None = None,
                 on_mel=None):
        if speech is None:
            raise ValueError("streaming synthesis needs a model with talker/token2wav weights")
        self.speech = speech
        cfg = speech.config.token2wav.dit
        self.dit_config = cfg
        self.layout = layout or StreamLayout.for_config(cfg)
        if (self.layout.block_size, self.layout.repeats) != (cfg.block_size, cfg.repeats):
            raise ValueError(f"layout block_size/repeats {self.layout.block_size}/{self.layout.repeats} do not match "
                             f"the DiT config {cfg.block_size}/{cfg.repeats}")
        self.hop = speech.config.token2wav.bigvgan.upsample_factor
        voices = list(voice) if isinstance(voice, (list, tuple)) else [voice] * rows
        voices = [resolve_voice(speech.speakers, v) for v in voices]  # names -> Voice; unknown names fail here
        if len(voices) != rows or not all(isinstance(v, Voice) for v in voices):
            raise ValueError(f"voice must be a speaker name / Voice, or a list of {rows} of them")
        if len({v.ref_mel.shape for v in voices}) != 1:
            raise ValueError("all rows' voices must have reference mels of the same length")
        if noise is not None and len(noise) != rows:
            raise ValueError(f"noise must be a list of {rows} [frames, {cfg.mel_dim}] arrays, got {len(noise)}")
        self.rows = [
            _Row(codes=[], voice=v, key=None if noise is not None else jax.random.key(seed + r),
                 noise=None if noise is None else np.asarray(noise[r], np.float32).reshape(-1, cfg.mel_dim))
            for r, v in enumerate(voices)]
        self.ode = dict(num_steps=num_steps, guidance_scale=guidance_scale, sway_coefficient=sway_coefficient)
        self.on_mel = on_mel  # optional on_mel(row, first_frame, mel [frames, mel]) per DiT chunk
        self._cond = jnp.asarray(np.stack([v.cond for v in voices]), jnp.float32)  # [B, enc_emb_dim]
        self._ref = jnp.asarray(np.stack([v.ref_mel for v in voices]), jnp.float32)  # [B, T_ref, mel]

    # ------------------------------------------------------------------ public
    def push(self, codes) -> list[np.ndarray]:
        """Single stream: add codec ids; returns the audio chunks that became ready (possibly none)."""
        self._single()
        return self.push_rows([codes])[0]

    def finish(self) -> list[np.ndarray]:
        """Single stream: no more codes; returns the remaining audio chunks."""
        self._single()
        return self.finish_rows()[0]

    def push_rows(self, codes_per_row: Sequence) -> list[list[np.ndarray]]:
        """Add codec ids per row (None or empty for none); returns the ready chunks per row."""
        if len(codes_per_row) != len(self.rows):
            raise ValueError(f"push_rows needs one entry per row ({len(self.rows)}), got {len(codes_per_row)}")
        new = [np.zeros((0,), np.int64) if c is None else np.asarray(c).reshape(-1) for c in codes_per_row]
        for r, codes in enumerate(new):  # check every row before changing any
            if len(codes) == 0:
                continue
            if self.rows[r].finished:
                raise ValueError(f"row {r}: push after finish")
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"row {r}: codec ids must be integers, got dtype {codes.dtype}")
            check_codes(codes, self.dit_config.num_embeds, what=f"row {r}: codec ids")
        for row, codes in zip(self.rows, new):
            row.codes.extend(codes.tolist())
        return self._advance()

    def finish_rows(self, rows: Sequence[int] | None = None) -> list[list[np.ndarray]]:
        """Mark rows (default: all) finished; returns every row's chunks that became ready."""
        for r in range(len(self.rows)) if rows is None else rows:
            self.rows[r].finished = True
        return self._advance()

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ internals
    def _single(self):
        if len(self.rows) != 1:
            raise ValueError(f"this stream has {len(self.rows)} rows: use push_rows / finish_rows")

    def _chunk_span(self, row: _Row) -> Optional[tuple[int, int, int, bool]]:
        """(window start, window end, chunk end, last) in mel frames for the row's next chunk, or None."""
        lay = self.layout
        k, frames = row.next_chunk, lay.repeats * len(row.codes)
        begin = k * lay.chunk
        if frames >= begin + lay.chunk + lay.future and not row.finished:
            return max(begin - lay.past, 0), begin + lay.chunk + lay.future, begin + lay.chunk, False
        if row.finished and frames > begin and not row.done:
            return max(begin - lay.past, 0), frames, frames, True
        return None

    def _noise(self, r: int, row: _Row, start: int) -> jax.Array:
        """[W, mel] start noise for window frames [start, start + W)."""
        lay, mel = self.layout, self.dit_config.mel_dim
        if row.key is not None:
            return position_noise(row.key, start, num_frames=lay.window, mel_dim=mel, block_size=lay.block_size)
        frames = lay.repeats * len(row.codes)
        if row.noise.shape[0] < frames:
            raise ValueError(f"row {r}: the given noise covers {row.noise.shape[0]} mel frames, the codes need "
                             f"{frames}")
        out = np.zeros((lay.window, mel), np.float32)
        part = row.noise[start:start + lay.window]
        out[:len(part)] = part
        return jnp.asarray(out)

    def _advance(self) -> list[list[np.ndarray]]:
        """Run every ready chunk (all rows batched into one DiT call per round) and vocode it."""
        lay = self.layout
        out: list[list[np.ndarray]] = [[] for _ in self.rows]
        while True:
            spans = [self._chunk_span(row) for row in self.rows]
            if all(s is None for s in spans):
                return out
            codes = np.zeros((len(self.rows), lay.window // lay.repeats), np.int32)
            mask = np.zeros((len(self.rows), lay.window), np.int32)
            noise = []
            for r, (row, span) in enumerate(zip(self.rows, spans)):
                if span is None:
                    noise.append(jnp.zeros((lay.window, self.dit_config.mel_dim), jnp.float32))
                    continue
                start, end = span[0], span[1]
                window_codes = row.codes[start // lay.repeats:end // lay.repeats]
                codes[r, :len(window_codes)] = window_codes
                mask[r, :end - start] = 1
                noise.append(self._noise(r, row, start))
            mel = window_mel(self.dit_config, self.speech.dit.options, {"params": self.speech.dit_params},
                             jnp.asarray(codes), self._cond, self._ref, jnp.stack(noise), jnp.asarray(mask),
                             **self.ode)
            mel = np.asarray(mel)  # [B, W, mel]
            for r, (row, span) in enumerate(zip(self.rows, spans)):
                if span is None:
                    continue
                start, _, chunk_end, last = span
                begin = row.next_chunk * lay.chunk
                row.mel.append(mel[r, begin - start:chunk_end - start])
                row.next_chunk += 1
                if self.on_mel is not None:
                    self.on_mel(r, begin, row.mel[-1])
                out[r].append(self._vocode(row, begin, chunk_end, last))
                if last:
                    row.mel, row.done = [], True

    def _vocode(self, row: _Row, begin: int, end: int, last: bool) -> np.ndarray:
        """Audio for the chunk [begin, end) just appended to row.mel, with the released vocoder overlap.

        The first chunk vocodes [0, 72) and keeps [0, 52); every later one vocodes the `vocoder_window` (135)
        frames before its end (the release: 40 frames before the chunk start; more context never hurts) and
        keeps [begin − 20, end − 20), the last one up to the end."""
        lay, hop, overlap = self.layout, self.hop, self.layout.vocoder_overlap
        row.mel = row.mel[-3:]  # ≥ 145 frames once three chunks exist, else everything from frame 0
        history = np.concatenate(row.mel, axis=0)  # frames [end − len(history), end)
        window_start = 0 if begin == 0 else end - min(end, lay.vocoder_window)
        wave = self.speech.vocode(history[len(history) - (end - window_start):].T)  # [(end − window_start)·hop]
        first_out = 0 if begin == 0 else begin - overlap
        stop_frame = end if last else end - overlap
        chunk = wave[(first_out - window_start) * hop:(stop_frame - window_start) * hop]
        row.samples_out += len(chunk)
        return chunk


class TalkerAudioStream:
    """Glue between the talker's chunked decode and a StreamingToken2Wav (used by `OmniModel.generate`).

    Called with each row's codes so far (already cut at the end token) and which rows have ended; pushes the
    new codes, finishes ended rows, and hands every chunk to `on_audio(row, chunk)` as soon as it exists.
    `close()` finishes all rows and returns each row's full waveform (the concatenation of its chunks)."""

    def __init__(self, stream: StreamingToken2Wav, on_audio):
        self.stream, self.on_audio = stream, on_audio
        self.pushed = [0] * stream.num_rows
        self.chunks: list[list[np.ndarray]] = [[] for _ in range(stream.num_rows)]

    def __call__(self, codes_per_row: Sequence[np.ndarray], ended) -> None:
        new = [np.asarray(c)[self.pushed[r]:] for r, c in enumerate(codes_per_row)]
        self.pushed = [len(c) for c in codes_per_row]
        self._deliver(self.stream.push_rows(new))
        finished = [r for r, e in enumerate(ended) if e and not self.stream.rows[r].finished]
        if finished:
            self._deliver(self.stream.finish_rows(finished))

    def close(self) -> list[np.ndarray]:
        self._deliver(self.stream.finish_rows())
        return [np.concatenate(c) if c else np.zeros((0,), np.float32) for c in self.chunks]

    def _deliver(self, chunks_per_row) -> None:
        for row, chunks in enumerate(chunks_per_row):
            for chunk in chunks:
                if len(chunk):
                    self.chunks[row].append(chunk)
                    self.on_audio(row, chunk)
