"""TMRoPE (time-aligned multimodal RoPE) position ids, host side (numpy only; no torch, no jax).

One public entry point, `rope_index`, builds the [3, B, L] (temporal, height, width) position ids of a
prompt and the per-row `rope_deltas` used while decoding. It reproduces HF transformers 5.24
`Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index` exactly (spec §7.2), including its
quirks, and validates the token layout instead of silently producing garbage or crashing.

Layout rules (per batch row, over the non-pad tokens; `s` = position the span's bos gets):

* text: consecutive positions, identical on the 3 axes.
* image `<|vision_bos|> <|IMAGE|>×(t·h·w/m²) <eos>`, grid (t, h, w), merge m:
  bos = s; token (g, r, c) in (t, h/m, w/m) row-major order = (s+1 + g·25, s+1 + r, s+1 + c); eos = max + 1.
* video `<|vision_bos|> <|VIDEO|>×(t·h·w/m²) <eos>`: as an image, with temporal index
  floor(float32(g · second_per_grid) · 25) (HF computes it in float32; see `_video_time_index`).
* audio `<|audio_bos|> <|AUDIO|>×n <|audio_eos|>`, n = `audio_token_count(frames)`: all consecutive.
* audio in video (`use_audio_in_video=True`), spec §3.5:
  `<|vision_bos|><|audio_bos|> V…V A…A V…V A…A … <|audio_eos|><|vision_eos|>`. Both bos tokens get s.
  Video tokens get the video positions above (from s+1), audio token i gets s+1+i, and the positions are emitted
  as video chunk 0, audio chunk 0, video chunk 1, … (chunks of 25·2 = 50 temporal units, `_chunk_bounds`).
  Both eos tokens get (max of the LAST emitted chunk) + 1 (an HF quirk: not the span max, see below).

Worked example 1 (spec §7.4; grids (1,4,4) image, 20 mel frames -> 5 audio tokens, (2,4,4) video at 1 s/grid):

    T T <vb> IMG×4 <ve> T <ab> AUD×5 <ae> <vb> VID×8 <ve> T
    t: 0 1  2   3 3 3 3   5  6  7   8..12   13  14  15×4 40×4 41  42
    h: 0 1  2   3 3 4 4   5  6  7   8..12   13  14  15 15 16 16 (×2) 41 42
    w: 0 1  2   3 4 3 4   5  6  7   8..12   13  14  15 16 15 16 (×2) 41 42
    rope_delta = 43 - 27 = 16

Worked example 2 (audio in video; grid (3,4,4) at 1 s/grid -> temporal 0/25/50; 300 frames -> 75 tokens):

    T <vb><ab> V×8 (t = 2,2,2,2,27,27,27,27) A×50 (2..51) V×4 (t = 52) A×25 (52..76) <ae><ve> (77, 77) T (78)
    rope_delta = 79 - 93 = -14

HF behaviours kept on purpose (a port must match them bit for bit):

* Text-only fast path (both `image_grid_thw` and `video_grid_thw` None): positions = cumsum(mask) - 1, pads = 1,
  and rope_delta = max over the WHOLE row including the pad 1s, + 1 - n_valid. So a row with a single real token
  and some padding gets delta 1, not 0; a fully padded row gets delta 2.
* Otherwise pads get position 1 too, and rope_delta = max over the real tokens + 1 - n_valid.
* The position after a block is (max of the last emitted block) + 1. For audio in video this is the last chunk
  (usually audio), so when the video runs past the end of the audio inside the final chunk, the eos tokens and
  the following text re-use temporal values already taken by video tokens.
* Chunk splitting advances one chunk per token: when temporal values jump over a whole chunk (second_per_grid >
  2 s), the jump is split into single-token chunks and video chunk j is paired with audio chunk j although they
  no longer cover the same time.
* The video temporal index is computed in float32 and truncated: for second_per_grid = 0.9, grid 6 gets
  floor(float32(5.4) · 25) = 134, not 135.

Deviations (inputs on which HF crashes or silently mis-assigns; here they raise a ValueError naming the batch row
and the item): a placeholder count that does not match its grid / audio length, more or fewer placeholders than
grids or audios, a placeholder without its bos, a span not followed by its end token(s), `audio_seqlens` missing,
audio with 0 tokens, a plain video (or an audio-in-video span) in the wrong `use_audio_in_video` mode. A fully
padded row on the multimodal path gets pads = 1 and delta 0 (HF crashes), a trailing `<|vision_bos|>` is text
(HF raises IndexError), and `attention_mask=None` means no padding on both paths (HF's fast path crashes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

__all__ = ["RopeTokenIds", "rope_index", "decode_positions", "audio_token_count"]


# ------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class RopeTokenIds:
    """Everything `rope_index` reads from the config."""

    image: int
    video: int
    audio: int
    vision_start: int
    audio_start: int
    spatial_merge_size: int
    position_id_per_seconds: int | float
    seconds_per_chunk: int | float

    @classmethod
    def from_config(cls, config: Any) -> "RopeTokenIds":
        """From a `ThinkerConfig` / `TalkerConfig`, an HF thinker config, or any namespace with the fields.

        Token ids are read as `<name>_token_index` or `<name>_token_id`; the merge size as
        `vision.spatial_merge_size`, `vision_config.spatial_merge_size` or `spatial_merge_size`.
        """
        if isinstance(config, cls):
            return config

        def get(*names):
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return value
            raise ValueError(f"config {type(config).__name__} has none of the fields {names} needed by rope_index")

        merge = None
        for sub in ("vision", "vision_config"):
            merge = getattr(getattr(config, sub, None), "spatial_merge_size", None)
            if merge is not None:
                break
        if merge is None:
            merge = get("spatial_merge_size")
        return cls(
            image=int(get("image_token_index", "image_token_id")),
            video=int(get("video_token_index", "video_token_id")),
            audio=int(get("audio_token_index", "audio_token_id")),
            vision_start=int(get("vision_start_token_id")),
            audio_start=int(get("audio_start_token_id")),
            spatial_merge_size=int(merge),
            position_id_per_seconds=get("position_id_per_seconds"),
            seconds_per_chunk=get("seconds_per_chunk"),
        )


# ------------------------------------------------------------------------------------------ small helpers

def audio_token_count(frames) -> np.ndarray:
    """LM audio tokens for F valid mel frames (spec §3.2.7), vectorised; int64 array of the input's shape.

    F1 = ⌊(F−1)/2⌋ + 1 (conv stride 2), n = ⌊(F1−2)/2⌋ + 1 (pooling), i.e. 100 frames/s -> 25 tokens/s.
    Examples: 20 -> 5, 230 -> 57, 300 -> 75, 400 -> 100; 1 frame -> 0 tokens.
    """
    f = np.asarray(frames, dtype=np.int64)
    f1 = (f - 1) // 2 + 1
    return (f1 - 2) // 2 + 1


def decode_positions(rope_deltas, cache_positions) -> np.ndarray:
    """Positions [3, B, S] of decode-step tokens: cache_positions + rope_delta on all 3 axes.

    rope_deltas: [B] (or [B, 1]) from `rope_index`. cache_positions: [S] or [B, S], the index of each new token
    among the row's NON-PAD tokens (prompt tokens included). Without left padding this is the plain cache index;
    with left padding subtract the row's pad count (HF uses cumsum(attention_mask) - 1).
    Example: a prompt of 27 real tokens with delta 16 (§7.4 example 1) decodes its first new token at 27 + 16 = 43.
    """
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1)  # [B]
    pos = np.asarray(cache_positions, dtype=np.int64)
    if pos.ndim == 1:
        pos = np.broadcast_to(pos[None, :], (deltas.shape[0], pos.shape[0]))
    if pos.ndim != 2 or pos.shape[0] != deltas.shape[0]:
        raise ValueError(f"cache_positions must be [S] or [B={deltas.shape[0]}, S], "
                         f"got shape {np.shape(cache_positions)}")
    out = pos + deltas[:, None]  # [B, S]
    return np.broadcast_to(out[None], (3,) + out.shape).copy()


def _video_time_index(grid_t: int, second_per_grid: float, per_second) -> np.ndarray:
    """Temporal offsets [grid_t] of a video, exactly as HF: float32(g · float32(sec)) · per_second, truncated."""
    g = np.arange(grid_t, dtype=np.float32)
    return (g * np.float32(second_per_grid) * np.float32(per_second)).astype(np.int64)


def _chunk_bounds(values: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    """Split a non-decreasing list of temporal values into [start, end) chunks, exactly as HF.

    A new chunk starts at the first element with value >= k·per_chunk and k then advances by ONE. So
    [0,0,25,25,50] with 50 -> [(0,4), (4,5)]; a jump over whole chunks ([0,0,150,150,150,150]) splits one
    token off per skipped chunk: [(0,2), (2,3), (3,4), (4,6)].
    """
    bounds, start, k = [], 0, 1
    for i, v in enumerate(values.tolist()):
        if v >= k * per_chunk:
            bounds.append((start, i))
            start, k = i, k + 1
    bounds.append((start, len(values)))
    return bounds


def _vision_block(start: int, grid, time_index: np.ndarray, merge: int) -> np.ndarray:
    """Positions [3, t·(h/m)·(w/m)] of one image/video, (g, r, c) row-major, all offset by `start`."""
    _, h, w = (int(x) for x in grid)
    hm, wm = h // merge, w // merge
    t = np.repeat(time_index, hm * wm)                       # [n]
    r = np.tile(np.repeat(np.arange(hm), wm), len(time_index))  # [n]
    c = np.tile(np.arange(wm), hm * len(time_index))         # [n]
    return np.stack([t, r, c]).astype(np.int64) + start


# ------------------------------------------------------------------------------------------ per-row builder

class _Row:
    """Position blocks of one batch row. `next` = max of the LAST block + 1 (HF's rule), 0 at the start."""

    def __init__(self):
        self.blocks: list[np.ndarray] = []  # each [3, n]

    @property
    def next(self) -> int:
        return int(self.blocks[-1].max()) + 1 if self.blocks else 0

    def add(self, block: np.ndarray) -> None:
        self.blocks.append(block)

    def text(self, n: int) -> None:
        """n consecutive positions on all axes (also used for bos/eos tokens)."""
        if n > 0:
            self.add(np.broadcast_to(np.arange(n, dtype=np.int64) + self.next, (3, n)))

    def result(self) -> np.ndarray:
        return np.concatenate(self.blocks, axis=1) if self.blocks else np.zeros((3, 0), np.int64)


class _Items:
    """Grids / lengths of one modality, consumed in row-major order across the batch."""

    def __init__(self, name: str, values: Optional[np.ndarray], extra: Optional[np.ndarray] = None):
        self.name, self.values, self.extra, self.used = name, values, extra, 0

    def take(self, row: int, col: int, what: str):
        k = self.used
        if self.values is None:
            raise ValueError(f"row {row}: {what} {k} (column {col}) found but no {self.name} was given")
        if k >= len(self.values):
            raise ValueError(f"row {row}: {what} {k} (column {col}) has no entry: {self.name} has only "
                             f"{len(self.values)} (more placeholders than items)")
        self.used += 1
        return k, self.values[k], (None if self.extra is None else self.extra[k])

    def check_all_used(self, what: str) -> None:
        n = 0 if self.values is None else len(self.values)
        if self.used != n:
            raise ValueError(f"{self.name} has {n} entries but the batch holds only {self.used} {what} "
                             f"placeholder span(s) (fewer placeholders than items)")


def _run_length(ids: np.ndarray, start: int, allowed: tuple[int, ...]) -> int:
    """Number of consecutive tokens from `start` whose id is in `allowed`."""
    end = start
    while end < len(ids) and int(ids[end]) in allowed:
        end += 1
    return end - start


class _RowParser:
    """Walks one row's real tokens left to right, one helper per modality span."""

    def __init__(self, ids: np.ndarray, row: int, tok: RopeTokenIds, images: _Items, videos: _Items,
                 audios: _Items, use_audio_in_video: bool):
        self.ids, self.row, self.tok = ids, row, tok
        self.images, self.videos, self.audios = images, videos, audios
        self.aiv = use_audio_in_video
        self.out = _Row()
        self.cursor = 0  # first token not yet given a position

    # -- checks

    def _fail(self, msg: str):
        raise ValueError(f"row {self.row}: {msg}")

    def _prev(self, j: int, back: int = 1) -> Optional[int]:
        return int(self.ids[j - back]) if j - back >= self.cursor else None

    def _check_grid(self, what: str, k: int, col: int, grid) -> tuple[int, int, int]:
        grid = tuple(int(x) for x in grid)
        m = self.tok.spatial_merge_size
        if len(grid) != 3 or min(grid) <= 0 or grid[1] % m or grid[2] % m:
            self._fail(f"{what} {k} (column {col}): grid {grid} must be 3 positive ints with h and w divisible "
                       f"by spatial_merge_size {m}")
        return grid

    def _check_span(self, what: str, k: int, col: int, found: int, need: int, detail: str) -> None:
        if found != need:
            self._fail(f"{what} {k} (column {col}): span has {found} placeholder tokens but {detail} needs {need}")

    def _check_tail(self, what: str, k: int, col: int, end: int, n_eos: int) -> None:
        if end + n_eos > len(self.ids):
            self._fail(f"{what} {k} (column {col}): span must be followed by {n_eos} end token(s) "
                       f"(<|vision_eos|> / <|audio_eos|>) but the row ends")

    def _audio_len(self, k: int, col: int, frames) -> int:
        n = int(audio_token_count(frames))
        if n <= 0:
            self._fail(f"audio {k} (column {col}): {int(frames)} mel frames give {n} audio tokens (need >= 1)")
        return n

    # -- spans; j = column of the first placeholder token, returns the cursor after the span's eos

    def image(self, j: int) -> int:
        """`<|vision_bos|> <|IMAGE|>×n <eos>`: bos = s, tokens (s+1+g·25, s+1+r, s+1+c), eos = max+1."""
        tok = self.tok
        k, grid, _ = self.images.take(self.row, j, "image")
        if self._prev(j) != tok.vision_start:
            self._fail(f"image {k} (column {j}): <|IMAGE|> must follow <|vision_bos|>")
        t, h, w = self._check_grid("image", k, j, grid)
        m = tok.spatial_merge_size
        n = t * h * w // (m * m)
        self._check_span("image", k, j, _run_length(self.ids, j, (tok.image,)), n, f"grid {(t, h, w)} with merge {m}")
        self._check_tail("image", k, j, j + n, 1)
        self.out.text(j - 1 - self.cursor)  # text before the bos
        self.out.text(1)                    # <|vision_bos|>
        time_index = np.arange(t, dtype=np.int64) * int(tok.position_id_per_seconds)
        self.out.add(_vision_block(self.out.next, (t, h, w), time_index, m))
        self.out.text(1)                    # <|vision_eos|>
        return j + n + 1

    def video(self, j: int) -> int:
        """`<|vision_bos|> <|VIDEO|>×n <eos>`: as an image with temporal index ⌊g·sec·25⌋ (float32)."""
        tok = self.tok
        k, grid, sec = self.videos.take(self.row, j, "video")
        prev = self._prev(j)
        if prev == tok.audio_start:
            self._fail(f"video {k} (column {j}): <|VIDEO|> follows <|audio_bos|> (an audio-in-video span) but "
                       f"use_audio_in_video is False")
        if prev != tok.vision_start:
            self._fail(f"video {k} (column {j}): <|VIDEO|> must follow <|vision_bos|>")
        t, h, w = self._check_grid("video", k, j, grid)
        m = tok.spatial_merge_size
        n = t * h * w // (m * m)
        self._check_span("video", k, j, _run_length(self.ids, j, (tok.video,)), n, f"grid {(t, h, w)} with merge {m}")
        self._check_tail("video", k, j, j + n, 1)
        self.out.text(j - 1 - self.cursor)
        self.out.text(1)
        time_index = _video_time_index(t, sec, tok.position_id_per_seconds)
        self.out.add(_vision_block(self.out.next, (t, h, w), time_index, m))
        self.out.text(1)
        return j + n + 1

    def audio(self, j: int) -> int:
        """`<|audio_bos|> <|AUDIO|>×n <|audio_eos|>`: all consecutive."""
        tok = self.tok
        if self._prev(j) != tok.audio_start:
            self._fail(f"audio {self.audios.used} (column {j}): <|AUDIO|> must follow <|audio_bos|>")
        if self.aiv and self._prev(j, 2) == tok.vision_start:
            self._fail(f"audio {self.audios.used} (column {j}): audio-in-video span must start with <|VIDEO|> "
                       f"tokens (video chunk 0 precedes audio chunk 0)")
        k, frames, _ = self.audios.take(self.row, j, "audio")
        n = self._audio_len(k, j, frames)
        self._check_span("audio", k, j, _run_length(self.ids, j, (tok.audio,)), n, f"{int(frames)} mel frames")
        self._check_tail("audio", k, j, j + n, 1)
        self.out.text(j - 1 - self.cursor)
        self.out.text(1)
        self.out.text(n)
        self.out.text(1)
        return j + n + 1

    def video_with_audio(self, j: int) -> int:
        """`<|vision_bos|><|audio_bos|> (V…V A…A)×chunks <|audio_eos|><|vision_eos|>` (spec §3.5).

        Both bos get s. Video positions as in `video`, audio token i gets s+1+i, emitted chunk by chunk (video
        chunk k then audio chunk k). Positions follow HF's chunk order; which token in the span is VIDEO or AUDIO
        is only counted, not matched (HF does not look). Both eos get (max of the last chunk) + 1.
        """
        tok = self.tok
        if self._prev(j) != tok.audio_start or self._prev(j, 2) != tok.vision_start:
            if self._prev(j) == tok.vision_start:
                self._fail(f"video {self.videos.used} (column {j}): plain video (<|vision_bos|><|VIDEO|>) but "
                           f"use_audio_in_video is True; every video needs its audio (HF would mis-assign it)")
            self._fail(f"video {self.videos.used} (column {j}): <|VIDEO|> must follow <|vision_bos|><|audio_bos|>")
        kv, grid, sec = self.videos.take(self.row, j, "video")
        ka, frames, _ = self.audios.take(self.row, j, "audio")
        t, h, w = self._check_grid("video", kv, j, grid)
        m = tok.spatial_merge_size
        n_video = t * h * w // (m * m)
        n_audio = self._audio_len(ka, j, frames)
        span = _run_length(self.ids, j, (tok.video, tok.audio))
        seg = self.ids[j:j + span]
        self._check_span("video", kv, j, int(np.sum(seg == tok.video)), n_video,
                         f"grid {(t, h, w)} with merge {m} (<|VIDEO|> count)")
        self._check_span(f"audio {ka} of video", kv, j, int(np.sum(seg == tok.audio)), n_audio,
                         f"{int(frames)} mel frames (<|AUDIO|> count)")
        self._check_tail("video", kv, j, j + span, 2)

        self.out.text(j - 2 - self.cursor)
        self.out.text(1)                                   # <|vision_bos|>
        self.out.add(self.out.blocks[-1])                  # <|audio_bos|>: same position
        s1 = self.out.next
        time_index = _video_time_index(t, sec, tok.position_id_per_seconds)
        video_pos = _vision_block(s1, (t, h, w), time_index, m)            # [3, n_video]
        audio_pos = np.broadcast_to(np.arange(n_audio, dtype=np.int64) + s1, (3, n_audio))  # [3, n_audio]
        per_chunk = int(tok.position_id_per_seconds * tok.seconds_per_chunk)
        v_chunks = _chunk_bounds(video_pos[0] - s1, per_chunk)
        a_chunks = _chunk_bounds(audio_pos[0] - s1, per_chunk)
        for c in range(max(len(v_chunks), len(a_chunks))):
            if c < len(v_chunks):
                self.out.add(video_pos[:, v_chunks[c][0]:v_chunks[c][1]])
            if c < len(a_chunks):
                self.out.add(audio_pos[:, a_chunks[c][0]:a_chunks[c][1]])
        self.out.text(1)                                   # <|audio_eos|>
        self.out.add(self.out.blocks[-1])                  # <|vision_eos|>: same position
        return j + span + 2

    # -- driver

    def parse(self) -> np.ndarray:
        """Positions [3, n_real] of this row."""
        tok, ids = self.tok, self.ids
        is_placeholder = np.isin(ids, (tok.image, tok.video, tok.audio))
        # a stray <|audio_bos|> makes HF run one item too many (crash or garbage)
        for col in np.flatnonzero(ids == tok.audio_start).tolist():
            nxt = int(ids[col + 1]) if col + 1 < len(ids) else None
            if nxt not in (tok.audio, tok.video):
                self._fail(f"<|audio_bos|> at column {col} is not followed by <|AUDIO|>"
                           + (" or <|VIDEO|>" if self.aiv else ""))
        while True:
            rest = np.flatnonzero(is_placeholder[self.cursor:])
            if rest.size == 0:
                break
            j = self.cursor + int(rest[0])
            kind = int(ids[j])
            if kind == tok.image:
                self.cursor = self.image(j)
            elif kind == tok.audio:
                self.cursor = self.audio(j)
            elif self.aiv:
                self.cursor = self.video_with_audio(j)
            else:
                self.cursor = self.video(j)
        self.out.text(len(ids) - self.cursor)
        return self.out.result()


# ------------------------------------------------------------------------------------------ entry point

def _as_2d(name: str, x, width: Optional[int] = None) -> Optional[np.ndarray]:
    if x is None:
        return None
    a = np.asarray(x)
    if width is not None:
        a = a.reshape(-1, width) if a.size else a.reshape(0, width)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be integer, got {a.dtype}")
        return a.astype(np.int64)
    return a.reshape(-1)


def rope_index(
    input_ids,
    attention_mask=None,
    *,
    image_grid_thw=None,
    video_grid_thw=None,
    audio_seqlens=None,
    video_second_per_grid=None,
    use_audio_in_video: bool = False,
    config: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """TMRoPE position ids of a (left-)padded prompt batch, identical to HF 5.24 `get_rope_index`.

    Args:
      input_ids: [B, L] token ids.
      attention_mask: [B, L] 0/1 (None = no padding). Pad tokens get position 1 on every axis.
      image_grid_thw: [n_img, 3] (t, h, w) patch grids; image k = k-th `<|vision_bos|><|IMAGE|>` span of the batch
        in row-major order.
      video_grid_thw: [n_vid, 3]; same ordering for `<|VIDEO|>` spans.
      audio_seqlens: [n_audio] valid mel frames per audio (feature_attention_mask.sum(-1)); audio k = k-th
        `<|audio_bos|>` of the batch (with `use_audio_in_video`, also those inside videos).
      video_second_per_grid: [n_vid] seconds per temporal grid (temporal_patch_size / fps; 1.0 at 2 fps).
      use_audio_in_video: every video span is an interleaved audio-in-video span (spec §3.5).
      config: `ThinkerConfig` (or `TalkerConfig`, an HF config, any namespace; see `RopeTokenIds.from_config`).

    Returns:
      positions [3, B, L] int64 (temporal, height, width) and rope_deltas [B] int64
      (= max position + 1 - number of real tokens, so decode position = real-token index + delta).

    See the module docstring for the worked examples and HF's edge behaviour.
    """
    tok = RopeTokenIds.from_config(config)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {ids.shape}")
    B, L = ids.shape
    if attention_mask is None:
        mask = np.ones((B, L), dtype=bool)
    else:
        m = np.asarray(attention_mask)
        if m.shape != (B, L):
            raise ValueError(f"attention_mask shape {m.shape} != input_ids shape {(B, L)}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = m.astype(bool)

    images = _as_2d("image_grid_thw", image_grid_thw, 3)
    videos = _as_2d("video_grid_thw", video_grid_thw, 3)
    audios = _as_2d("audio_seqlens", audio_seqlens)
    secs = _as_2d("video_second_per_grid", video_second_per_grid)
    if videos is not None and len(videos):
        if secs is None:
            raise ValueError("video_grid_thw is given but video_second_per_grid is None (1.0 at the default 2 fps)")
        if len(secs) != len(videos):
            raise ValueError(f"video_second_per_grid has {len(secs)} entries, video_grid_thw has {len(videos)}")
        secs = secs.astype(np.float32)  # HF: .float()

    image_items = _Items("image_grid_thw", images)
    video_items = _Items("video_grid_thw", videos, secs)
    audio_items = _Items("audio_seqlens", audios)

    positions = np.ones((3, B, L), dtype=np.int64)  # pads: 1
    deltas = np.zeros((B,), dtype=np.int64)
    row_positions = []
    for b in range(B):
        real = ids[b][mask[b]]
        pos = _RowParser(real, b, tok, image_items, video_items, audio_items, bool(use_audio_in_video)).parse()
        row_positions.append(pos)
        positions[:, b, mask[b]] = pos
        deltas[b] = int(pos.max()) + 1 - real.shape[0] if real.shape[0] else 0
    image_items.check_all_used("image")
    video_items.check_all_used("video")
    audio_items.check_all_used("audio")

    if image_grid_thw is None and video_grid_thw is None:
        # HF's text/audio fast path: cumsum(mask) - 1 with pads = 1; the delta's max includes the pad 1s.
        # For validated input the real-token positions equal those built above.
        fast = np.where(mask, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)  # [B, L]
        positions = np.broadcast_to(fast[None], (3, B, L)).copy()
        max_pos = fast.max(axis=1) if L else np.zeros((B,), np.int64)
        deltas = (max_pos + 1 - mask.sum(axis=1)).astype(np.int64)
    return positions, deltas
