"""The talker's teacher-forced view of a packed thinker row (host side, int arrays only).

At generation (omni_jax.speech.build_talker_inputs, api.OmniModel._talk) the talker of one sample with prompt
p_1..p_P, reply y_1..y_n (ending with <|im_end|>) and codec ids c_1..c_m is fed, in thinker space:

  talker index i      input                                          target
  0 .. P-1            H[p_i] + E[p_i]   (E = 0 at media placeholders)  -
  P                   embed(speaker_bos) + codec_embed(codec_pad)     -
  P+1                 H[y_1] + E[y_1] + codec_embed(codec_bos)        c_1
  P+1+k, k = 1..m     codec_embed(c_k) + R[k-1]                       c_{k+1}; codec_end after c_m
  R[j] = H[y_{j+2}] + E[y_{j+2}] for j < n-2, embed(tts_eos) at j = n-2, embed(tts_pad) after

with H = thinker post-norm hidden state, E = merged input embedding. Talker TMRoPE positions: the prompt's
own positions, then s, s+1, ... from index P on (s = max prompt position + 1): what `rope_index(config=talker)`
gives over [prompt, speaker_bos, y_1] followed by +1 per codec token (talker and thinker share the TMRoPE
token ids and rates, spec §8).

Here that layout becomes per-row index arrays (-1 = nothing to add); the train step gathers and sums
(train/step.py). The reply is the last assistant reply of the sample (its run of assistant_mask, through
<|im_end|>); a sample without codec ids, or with a reply shorter than 2 tokens (generation needs 2), gets no
talker tokens.

Batch keys (all [B, Lt] int32 unless said; Lt = TalkerLayout.seq_len):
  talker_hidden_from   position in the thinker row whose H is added (-1: none)
  talker_embed_from    position in the thinker row whose E is added (-1: none; media placeholders)
  talker_thinker_ids   thinker-vocab id whose embedding is added (speaker bos, tts_eos, tts_pad; -1: none)
  talker_codec_ids     codec id whose codec embedding is added (-1: none)
  talker_targets       codec target ids (0 where no loss)
  talker_loss_mask     float32, 1 at the m+1 loss positions of each sample
  talker_segment_ids   1, 2, ... as the sample's thinker segment; 0 = padding
  talker_positions     [3, B, Lt] TMRoPE positions
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from omni_jax.processing.tokenizer import AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

TALKER_KEYS = ("talker_hidden_from", "talker_embed_from", "talker_thinker_ids", "talker_codec_ids",
               "talker_targets", "talker_loss_mask", "talker_segment_ids")  # [B, Lt]; + talker_positions


@dataclasses.dataclass(frozen=True)
class TalkerLayout:
    """What the packer needs to lay out talker rows: the row length and the special ids (model config)."""

    seq_len: int  # Lt of every talker row
    speaker_bos: int  # thinker-vocab id of the voice's speaker bos
    tts_eos: int  # thinker-vocab tts_text_end_token_id
    tts_pad: int  # thinker-vocab tts_text_pad_token_id
    codec_pad: int
    codec_bos: int
    codec_end: int
    placeholder_ids: tuple = (AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)

    @classmethod
    def from_config(cls, talker_config, seq_len: int, speaker_bos: int) -> "TalkerLayout":
        t = talker_config
        return cls(seq_len=int(seq_len), speaker_bos=int(speaker_bos), tts_eos=t.tts_text_end_token_id,
                   tts_pad=t.tts_text_pad_token_id, codec_pad=t.tts_codec_pad_token_id,
                   codec_bos=t.tts_codec_start_token_id, codec_end=t.tts_codec_end_token_id,
                   placeholder_ids=(t.audio_token_index, t.image_token_index, t.video_token_index))


def reply_span(sample: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """(P, n): start and length of the sample's last assistant reply, or None without one."""
    mask = np.asarray(sample["assistant_mask"], bool)
    where = np.flatnonzero(mask)
    if not len(where):
        return None
    end = int(where[-1]) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end - start


def talker_length(sample: Mapping[str, Any]) -> int:
    """Talker tokens of a sample (P + 2 + m), 0 when it trains no talker."""
    m = len(sample.get("codec", ()))
    span = reply_span(sample) if m else None
    if span is None or span[1] < 2:
        return 0
    return span[0] + 2 + m


def empty_view(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """A talker view with no talker tokens: [rows, seq_len] (+ positions [3, rows, seq_len])."""
    out = {key: np.full((rows, seq_len), -1, np.int32) for key in TALKER_KEYS[:4]}
    out["talker_targets"] = np.zeros((rows, seq_len), np.int32)
    out["talker_loss_mask"] = np.zeros((rows, seq_len), np.float32)
    out["talker_segment_ids"] = np.zeros((rows, seq_len), np.int32)
    out["talker_positions"] = np.zeros((3, rows, seq_len), np.int32)
    return out


def collate_talker(rows: Sequence[Sequence[Mapping[str, Any]]], layout: TalkerLayout) -> dict[str, np.ndarray]:
    """Packed rows of samples (thinker segment order, as packing.collate lays them out) -> the talker view.

    Raises ValueError naming the row when its samples' talker tokens exceed layout.seq_len."""
    out = empty_view(len(rows), layout.seq_len)
    hidden_from, embed_from = out["talker_hidden_from"], out["talker_embed_from"]
    thinker_ids, codec_ids = out["talker_thinker_ids"], out["talker_codec_ids"]
    targets, loss_mask = out["talker_targets"], out["talker_loss_mask"]
    segments, positions = out["talker_segment_ids"], out["talker_positions"]
    for b, row in enumerate(rows):
        offset = 0  # in the thinker row
        t = 0  # in the talker row
        for seg, s in enumerate(row, start=1):
            length = talker_length(s)
            if length:
                if t + length > layout.seq_len:
                    ids = [x.get("id", "?") for x in row]
                    raise ValueError(f"row {b} (samples {ids}): its talker tokens exceed talker seq_len "
                                     f"{layout.seq_len}; raise data.talker_seq_len")
                P, n = reply_span(s)
                codes = np.asarray(s["codec"], np.int32)
                m = len(codes)
                ids = np.asarray(s["input_ids"])
                pos = np.asarray(s["positions"])  # [3, n_s]
                sl = slice(t, t + length)
                segments[b, sl] = seg
                # prompt: H + E (E zero at placeholders)
                hidden_from[b, t:t + P] = offset + np.arange(P)
                embed_from[b, t:t + P] = np.where(np.isin(ids[:P], layout.placeholder_ids), -1,
                                                  offset + np.arange(P))
                positions[:, b, t:t + P] = pos[:, :P]
                start = int(pos[:, :P].max()) + 1 if P else 0
                positions[:, b, t + P:t + length] = start + np.arange(length - P)
                # speaker bos + codec pad
                thinker_ids[b, t + P] = layout.speaker_bos
                codec_ids[b, t + P] = layout.codec_pad
                # y_1 + codec bos -> c_1
                hidden_from[b, t + P + 1] = embed_from[b, t + P + 1] = offset + P
                codec_ids[b, t + P + 1] = layout.codec_bos
                # codec_embed(c_k) + R[k-1] -> c_{k+1} (codec_end after c_m)
                k = np.arange(1, m + 1)
                at = t + P + 1 + k
                codec_ids[b, at] = codes
                j = k - 1
                real = j < n - 2
                hidden_from[b, at[real]] = embed_from[b, at[real]] = offset + P + 1 + j[real]
                thinker_ids[b, at[j == n - 2]] = layout.tts_eos
                thinker_ids[b, at[j > n - 2]] = layout.tts_pad
                loss_at = t + P + 1 + np.arange(m + 1)
                targets[b, loss_at] = np.append(codes, layout.codec_end)
                loss_mask[b, loss_at] = 1.0
                t += length
            offset += len(s["input_ids"])
    return out
