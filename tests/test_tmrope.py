"""TMRoPE position ids (`omni_jax.processing.tmrope`) against HF transformers 5.24 `get_rope_index`."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

from omni_jax.config import ThinkerConfig
from omni_jax.processing.tmrope import audio_token_count, decode_positions, rope_index

AUD, AB, AE = 151646, 151647, 151648
VB, VE, IMG, VID = 151652, 151653, 151655, 151656
PAD = 151643
CFG = ThinkerConfig()
MERGE, PPS, CHUNK = 2, 25, 50


# ------------------------------------------------------------------------------------------ oracle

@pytest.fixture(scope="module")
def hf():
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}),
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=16),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16,
                           fullatt_block_indexes=[0], spatial_merge_size=MERGE),
        vision_start_token_id=VB,  # not an HF field (spec §14.4)
    )
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()


# ------------------------------------------------------------------------------------------ sequence builder

def _chunks(values, per_chunk):
    """Split non-decreasing values into chunk lengths: a chunk ends before the first value >= k*per_chunk, then
    k += 1 (spec §3.5, including its one-step advance when values jump over a chunk)."""
    lengths, count, k = [], 0, 1
    for v in values:
        if v >= k * per_chunk:
            lengths.append(count)
            count, k = 0, k + 1
        count += 1
    return lengths + [count]


def aiv_placeholder(grid, sec, n_audio):
    """Tokens between <|vision_bos|> and <|vision_eos|> for a video with its audio, as the processor writes them."""
    t, h, w = grid
    video_times = np.repeat(np.arange(t) * sec * PPS, (h // MERGE) * (w // MERGE))  # float64 like the processor
    v, a = _chunks(video_times, CHUNK), _chunks(np.arange(n_audio), CHUNK)
    out = [AB]
    for j in range(max(len(v), len(a))):
        out += [VID] * (v[j] if j < len(v) else 0) + [AUD] * (a[j] if j < len(a) else 0)
    return out + [AE]


class Seq:
    """One prompt row with its grids / audios, built the way the processor expands placeholders."""

    def __init__(self, rng=None):
        self.rng = rng or np.random.default_rng(0)
        self.ids, self.images, self.videos, self.secs, self.audios = [], [], [], [], []

    def text(self, n):
        self.ids += self.rng.integers(10, 1000, n).tolist()
        return self

    def image(self, t, h, w):
        self.images.append((t, h, w))
        self.ids += [VB] + [IMG] * (t * h * w // MERGE**2) + [VE]
        return self

    def video(self, grid, sec=1.0):
        self.videos.append(tuple(grid))
        self.secs.append(sec)
        self.ids += [VB] + [VID] * (int(np.prod(grid)) // MERGE**2) + [VE]
        return self

    def audio(self, frames):
        self.audios.append(frames)
        self.ids += [AB] + [AUD] * int(audio_token_count(frames)) + [AE]
        return self

    def video_audio(self, grid, sec, frames):
        self.videos.append(tuple(grid))
        self.secs.append(sec)
        self.audios.append(frames)
        self.ids += [VB] + aiv_placeholder(grid, sec, int(audio_token_count(frames))) + [VE]
        return self


def batch(rows, extra_pad=None):
    """Left-padded ids / mask plus the row-major concatenated items (None where the batch has none)."""
    extra_pad = extra_pad or [0] * len(rows)
    total = max(len(r.ids) + p for r, p in zip(rows, extra_pad))
    ids = np.full((len(rows), total), PAD, np.int64)
    mask = np.zeros((len(rows), total), np.int64)
    for b, r in enumerate(rows):
        ids[b, total - len(r.ids):] = r.ids
        mask[b, total - len(r.ids):] = 1
    cat = lambda name: [x for r in rows for x in getattr(r, name)]
    images, videos, secs, audios = cat("images"), cat("videos"), cat("secs"), cat("audios")
    return dict(input_ids=ids, attention_mask=mask,
                image_grid_thw=np.array(images, np.int64) if images else None,
                video_grid_thw=np.array(videos, np.int64) if videos else None,
                video_second_per_grid=np.array(secs, np.float64) if secs else None,
                audio_seqlens=np.array(audios, np.int64) if audios else None)


def run_hf(model, b, aiv):
    t = lambda x, dt=torch.long: None if x is None else torch.tensor(x, dtype=dt)
    pos, delta = model.get_rope_index(
        t(b["input_ids"]), t(b["image_grid_thw"]), t(b["video_grid_thw"]), t(b["attention_mask"]), aiv,
        t(b["audio_seqlens"]), t(b["video_second_per_grid"], torch.float32))
    return pos.numpy(), delta.numpy().reshape(-1)


def check(model, b, aiv=False):
    """Ours == HF on positions and deltas; returns ours. (HF's text fast path needs a mask; the full path not.)"""
    pos, delta = rope_index(b["input_ids"], b["attention_mask"], image_grid_thw=b["image_grid_thw"],
                            video_grid_thw=b["video_grid_thw"], audio_seqlens=b["audio_seqlens"],
                            video_second_per_grid=b["video_second_per_grid"], use_audio_in_video=aiv, config=CFG)
    ref_pos, ref_delta = run_hf(model, b, aiv)
    assert pos.shape == ref_pos.shape and pos.dtype == np.int64 and delta.dtype == np.int64
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)
    return pos, delta


# ------------------------------------------------------------------------------------------ worked examples

def test_worked_example_1(hf):
    row = Seq().text(2).image(1, 4, 4).text(1).audio(20).video((2, 4, 4), 1.0).text(1)
    pos, delta = check(hf, batch([row]))
    t, h, w = pos[:, 0]
    np.testing.assert_array_equal(t[:7], [0, 1, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(h[3:7], [3, 3, 4, 4])
    np.testing.assert_array_equal(w[3:7], [3, 4, 3, 4])
    np.testing.assert_array_equal(pos[:, 0, 7:17], np.tile(np.arange(5, 15), (3, 1)))  # <ve> T <ab> A×5 <ae> <vb>
    np.testing.assert_array_equal(t[17:25], [15] * 4 + [40] * 4)
    np.testing.assert_array_equal(h[17:25], [15, 15, 16, 16] * 2)
    np.testing.assert_array_equal(w[17:25], [15, 16, 15, 16] * 2)
    np.testing.assert_array_equal(pos[:, 0, 25:], [[41, 42]] * 3)
    assert len(row.ids) == 27 and delta.tolist() == [16]


def test_worked_example_2(hf):
    row = Seq().text(1).video_audio((3, 4, 4), 1.0, 300).text(1)
    assert row.ids[1:3] == [VB, AB] and row.ids[3:11] == [VID] * 8 and row.ids[11:61] == [AUD] * 50
    assert row.ids[61:65] == [VID] * 4 and row.ids[65:90] == [AUD] * 25 and row.ids[90:92] == [AE, VE]
    pos, delta = check(hf, batch([row]), aiv=True)
    t = pos[0, 0]
    np.testing.assert_array_equal(t[:3], [0, 1, 1])
    np.testing.assert_array_equal(t[3:11], [2] * 4 + [27] * 4)
    np.testing.assert_array_equal(pos[:, 0, 11:61], np.tile(np.arange(2, 52), (3, 1)))
    np.testing.assert_array_equal(t[61:65], [52] * 4)
    np.testing.assert_array_equal(pos[:, 0, 65:90], np.tile(np.arange(52, 77), (3, 1)))
    np.testing.assert_array_equal(pos[:, 0, 90:], [[77, 77, 78]] * 3)
    assert len(row.ids) == 93 and delta.tolist() == [-14]


# ------------------------------------------------------------------------------------------ single cases

def test_text_only_left_padding(hf):
    rng = np.random.default_rng(1)
    rows = [Seq(rng).text(n) for n in (7, 3, 1, 5)]
    pos, delta = check(hf, batch(rows, [0, 2, 1, 0]))
    np.testing.assert_array_equal(pos[0, 1], [1] * 4 + [0, 1, 2])  # pads = 1
    assert delta.tolist() == [0, 0, 1, 0]  # HF quirk: a 1-token padded row gets delta 1 (the pad 1s count)
    _, delta = check(hf, batch([Seq(rng).text(4), Seq(rng)]))  # fully padded row: HF's fast path gives delta 2
    assert delta.tolist() == [0, 2]


def test_text_only_no_mask_and_decode(hf):
    ids = np.arange(10, 16)[None]
    pos, delta = rope_index(ids, None, config=CFG)
    np.testing.assert_array_equal(pos, np.tile(np.arange(6), (3, 1, 1)))
    assert delta.tolist() == [0]
    np.testing.assert_array_equal(decode_positions([16, -14], [27, 28]), [[[43, 44], [13, 14]]] * 3)
    np.testing.assert_array_equal(decode_positions(np.array([[3]]), [[5]]), [[[8]]] * 3)


def test_image_only(hf):
    check(hf, batch([Seq().text(3).image(1, 6, 8).text(2)]))
    check(hf, batch([Seq().image(1, 2, 2)]))  # starts with bos, ends with eos
    check(hf, batch([Seq().text(1).image(1, 4, 4).text(1)]), aiv=True)  # aiv flag without videos
    row = Seq()
    row.ids = [5, VB, 6, VB, IMG, VE, 7]  # a <|vision_bos|> without placeholder is plain text, as in HF
    row.images = [(1, 2, 2)]
    check(hf, batch([row]))
    # a trailing <|vision_bos|> is text here; HF raises IndexError (it reads the token after every vision bos)
    pos, _ = rope_index(np.array([row.ids + [VB]]), None, image_grid_thw=row.images, config=CFG)
    assert pos[:, 0, -1].tolist() == [7, 7, 7]


def test_no_attention_mask(hf):
    b = batch([Seq().text(2).image(1, 4, 2).audio(64).video((2, 2, 2), 0.5).text(1)])
    b["attention_mask"] = None
    check(hf, b)


def test_several_images_one_row(hf):
    row = Seq().text(2).image(1, 4, 4).image(1, 2, 8).text(3).image(1, 10, 2).text(1).image(1, 6, 6)
    check(hf, batch([row]))


def test_image_with_temporal_grid(hf):
    check(hf, batch([Seq().text(2).image(2, 4, 4).text(2)]))  # t > 1: temporal index g * 25, as HF


def test_batch_mixed_modalities_left_padding(hf):
    rng = np.random.default_rng(2)
    rows = [Seq(rng).text(3).image(1, 4, 6).text(2).audio(150).text(1),
            Seq(rng).text(1).video((3, 4, 4), 0.5).text(4).image(1, 2, 2).text(2)]
    check(hf, batch(rows, [3, 0]))
    check(hf, batch(rows[::-1], [0, 5]))


@pytest.mark.parametrize("sec", [1.0, 0.5, 0.4, 0.9, 0.28, 2 / 3, 3.0])
def test_video_second_per_grid(hf, sec):
    pos, _ = check(hf, batch([Seq().text(2).video((8, 4, 6), sec).text(2)]))
    t = pos[0, 0, 3:3 + 8 * 6:6] - 3
    np.testing.assert_array_equal(t, (np.arange(8, dtype=np.float32) * np.float32(sec) * np.float32(25)).astype(int))


def test_video_float32_time_index(hf):
    """HF truncates a float32 product: 6 grids at 0.9 s -> 134, not the exact 135."""
    pos, _ = check(hf, batch([Seq().video((7, 2, 2), 0.9)]))
    assert pos[0, 0, 1 + 6] - 1 == 134


def test_audio_only(hf):
    rng = np.random.default_rng(3)
    rows = [Seq(rng).text(2).audio(230).text(3).audio(20).text(1), Seq(rng).audio(4).text(2)]
    pos, delta = check(hf, batch(rows, [0, 4]))  # fast path: no vision grids
    assert audio_token_count([20, 230, 300, 400, 1, 3]).tolist() == [5, 57, 75, 100, 0, 1]


def test_audio_image_video_one_row(hf):
    row = Seq().text(3).audio(120).text(1).image(1, 4, 8).video((2, 6, 4), 1.0).text(2).audio(45).text(1)
    check(hf, batch([row]))


# ------------------------------------------------------------------------------------------ audio in video

@pytest.mark.parametrize("seconds", [3.0, 4.0, 7.3])
@pytest.mark.parametrize("grid_t", [2, 3, 4, 5])
def test_audio_in_video(hf, seconds, grid_t):
    frames = int(round(seconds * 100))
    row = Seq().text(3).video_audio((grid_t, 4, 6), 1.0, frames).text(2)
    check(hf, batch([row]), aiv=True)


def test_audio_in_video_mixed_batch(hf):
    rng = np.random.default_rng(4)
    rows = [Seq(rng).text(2).video_audio((4, 2, 4), 1.0, 400).text(1).image(1, 2, 2).text(1).audio(77).text(1),
            Seq(rng).audio(50).video_audio((2, 4, 4), 0.5, 90).video_audio((5, 2, 2), 1.0, 730).text(3)]
    check(hf, batch(rows, [2, 0]), aiv=True)


def test_audio_in_video_eos_follows_last_chunk(hf):
    """Video (temporal 1, 26) outlives the 15-token audio (1..15) inside chunk 0: HF gives both eos tokens
    last-chunk max + 1 = 16 although video temporal positions reach 26; the text after them gets 17."""
    row = Seq().video_audio((2, 2, 2), 1.0, 60).text(1)
    pos, delta = check(hf, batch([row]), aiv=True)
    assert pos[0, 0].max() == 26 and pos[:, 0, -3:].tolist() == [[16, 16, 17]] * 3 and delta.tolist() == [27 - 22]


def test_audio_in_video_skipped_chunk(hf):
    """3 s per grid (temporal 0, 75, 150, 225) jumps over chunks: HF splits single tokens off."""
    row = Seq().text(1).video_audio((4, 2, 4), 3.0, 730).text(1)
    v_lengths = [1 + row.ids[3:].index(AUD) - 1]
    assert v_lengths == [2]  # video chunk 0 = the 2 tokens of grid 0
    check(hf, batch([row]), aiv=True)


@pytest.mark.parametrize("grid,sec,frames", [((3, 4, 4), 1.0, 300), ((4, 22, 24), 1.0, 400), ((5, 2, 4), 0.5, 730),
                                             ((4, 2, 4), 3.0, 730), ((6, 2, 2), 0.4, 313), ((3, 2, 2), 2.5, 90)])
def test_builder_matches_hf_processor(grid, sec, frames):
    """Our §3.5 placeholder builder == HF's `replace_video_with_audio_token` (called without torchvision)."""
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=MERGE), audio_bos_token="<ab>",
                           audio_eos_token="<ae>", video_token="V", audio_token="A")
    fake.get_chunked_index = lambda idx, n: Qwen2_5OmniProcessor.get_chunked_index(fake, idx, n)
    n_audio = int(audio_token_count(frames))
    text = Qwen2_5OmniProcessor.replace_video_with_audio_token(
        fake, {"video_grid_thw": np.array([grid]), "video_second_per_grid": [sec]}, 0,
        {"num_audio_tokens": np.array([n_audio])}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)
    ours = aiv_placeholder(grid, sec, n_audio)
    assert text == "<ab>" + "".join("V" if x == VID else "A" for x in ours[1:-1]) + "<ae>"
    if grid == (4, 22, 24):  # spec §3.5 example: <ab> V×264 A×50 V×264 A×50 <ae>
        assert ours == [AB] + [VID] * 264 + [AUD] * 50 + [VID] * 264 + [AUD] * 50 + [AE]


# ------------------------------------------------------------------------------------------ fuzz

def _random_batch(rng):
    aiv = bool(rng.random() < 0.35)
    no_vision = bool(rng.random() < 0.2)
    rows = []
    for _ in range(int(rng.integers(1, 4))):
        row = Seq(rng).text(int(rng.integers(0, 5)))
        for _ in range(int(rng.integers(0, 5))):
            kind = rng.choice(["audio"] if no_vision else ["image", "video", "audio"])
            if kind == "image":
                row.image(1, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5)))
            elif kind == "audio":
                row.audio(int(rng.integers(3, 900)))
            else:
                grid = (int(rng.integers(1, 7)), 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)))
                sec = float(rng.choice([1.0, 0.5, 0.4, 0.9, 0.28, 2 / 3, 1.5, 2.5, 3.0]))
                if aiv:
                    row.video_audio(grid, sec, int(rng.integers(3, 900)))
                else:
                    row.video(grid, sec)
            row.text(int(rng.integers(0, 4)))
        if not row.ids:
            row.text(1)
        rows.append(row)
    return batch(rows, [int(x) for x in rng.integers(0, 6, len(rows))]), aiv


@pytest.mark.parametrize("seed", range(50))
def test_fuzz(hf, seed):
    b, aiv = _random_batch(np.random.default_rng(1000 + seed))
    check(hf, b, aiv)


# ------------------------------------------------------------------------------------------ errors

def _ours(b, aiv=False, **override):
    kw = dict(image_grid_thw=b["image_grid_thw"], video_grid_thw=b["video_grid_thw"],
              audio_seqlens=b["audio_seqlens"], video_second_per_grid=b["video_second_per_grid"])
    kw.update(override)
    return rope_index(b["input_ids"], b["attention_mask"], use_audio_in_video=aiv, config=CFG, **kw)


def test_error_more_placeholders_than_grids():
    b = batch([Seq().text(1).image(1, 2, 2), Seq().image(1, 2, 2).text(1).image(1, 4, 4)])
    with pytest.raises(ValueError, match=r"row 1: image 2 .*image_grid_thw has only 2"):
        _ours(b, image_grid_thw=b["image_grid_thw"][:2])


def test_error_fewer_placeholders_than_grids():
    b = batch([Seq().text(1).image(1, 2, 2).text(1)])
    with pytest.raises(ValueError, match=r"image_grid_thw has 2 entries .* only 1 image"):
        _ours(b, image_grid_thw=np.array([[1, 2, 2], [1, 4, 4]]))
    b = batch([Seq().text(1).audio(100).text(1)])
    with pytest.raises(ValueError, match=r"audio_seqlens has 2 entries"):
        _ours(b, audio_seqlens=[100, 40])


def test_error_span_length_mismatch():
    row = Seq().text(2).image(1, 4, 4).text(1)
    row.ids.insert(4, IMG)  # 5 image tokens for a grid that needs 4
    with pytest.raises(ValueError, match=r"row 0: image 0 \(column 3\): span has 5 placeholder tokens but grid "
                                         r"\(1, 4, 4\) with merge 2 needs 4"):
        _ours(batch([row]))
    b = batch([Seq().text(1), Seq().text(1).audio(100).text(1)])
    with pytest.raises(ValueError, match=r"row 1: audio 0 .*span has 25 placeholder tokens but 90 mel frames"):
        _ours(b, audio_seqlens=[90])
    b = batch([Seq().text(1).video_audio((2, 2, 2), 1.0, 100).text(1)])
    with pytest.raises(ValueError, match=r"row 0: audio 0 of video 0 .*span has 25 .*needs 24"):
        _ours(b, aiv=True, audio_seqlens=[96])


def test_error_missing_audio_seqlens():
    b = batch([Seq().text(1), Seq().image(1, 2, 2).audio(100).text(1)])
    with pytest.raises(ValueError, match=r"row 1: audio 0 \(column \d+\) found but no audio_seqlens"):
        _ours(b, audio_seqlens=None)
    with pytest.raises(ValueError, match=r"row 0: audio 0 .*no audio_seqlens"):  # also on the fast path
        _ours(batch([Seq().audio(100)]), audio_seqlens=None)


def test_error_layout():
    b = batch([Seq().text(1).video_audio((2, 2, 2), 1.0, 100).text(1)])
    with pytest.raises(ValueError, match=r"row 0: video 0 .*use_audio_in_video is False"):
        _ours(b)
    b = batch([Seq().text(1).video((2, 2, 2)).text(1)])
    with pytest.raises(ValueError, match=r"row 0: video 0 .*plain video"):
        _ours(b, aiv=True)
    with pytest.raises(ValueError, match=r"video_second_per_grid is None"):
        _ours(b, video_second_per_grid=None)
    b = batch([Seq().text(1).image(1, 2, 2)])
    b["input_ids"] = b["input_ids"][:, :-1]
    b["attention_mask"] = b["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match=r"row 0: image 0 .*followed by 1 end token"):
        _ours(b)
    with pytest.raises(ValueError, match=r"row 0: image 0 .*divisible by spatial_merge_size"):
        _ours(batch([Seq().text(1).image(1, 2, 2).text(1)]), image_grid_thw=[[1, 1, 4]])
    with pytest.raises(ValueError, match=r"row 0: <\|audio_bos\|> at column 1 is not followed"):
        rope_index(np.array([[5, AB, 6]]), None, config=CFG)
