"""Data pipeline: TFDS builders (omni_toy, conversation JSONL), processing, loss masks, packing, sharding,
determinism, checkpointable iterator state, and a packed batch through the tiny Thinker."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from media import write_image, write_video, write_wav

from omni_jax.data import DataConfig, build_dataset, load_source, make_eval_examples, make_train_iterator
from omni_jax.data import records
from omni_jax.data.conversation_builder import SKIP_REASONS
from omni_jax.data.packing import collate
from omni_jax.data.sample import Skip, process_record, rope_ids_for
from omni_jax.data.talker_view import TalkerLayout
from omni_jax.data.toy_task import CLASSES, OVERALL_CHANCE, TASKS, codec_pattern, toy_example
from omni_jax.processing import Processor, write_qwen_tokenizer
from omni_jax.processing.media import load_audio, load_image, load_video
from omni_jax.processing.tokenizer import ENDOFTEXT_ID, IM_END_ID

N_TRAIN, N_VAL = 20, 8
# the talker view with the tiny config's ids (talker_view.py); Lt = L + 64 fits the toy rows of L = 256
TALKER_LAYOUT = TalkerLayout(seq_len=320, speaker_bos=151870, tts_eos=151861, tts_pad=151859, codec_pad=8292,
                             codec_bos=8293, codec_end=8294)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_qwen_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    cfg = DataConfig(dataset="omni_toy", data_dir=str(tmp_path_factory.mktemp("tfds")), toy_num_train=N_TRAIN,
                     toy_num_validation=N_VAL, num_threads=2)
    build_dataset(cfg)
    return cfg


def _epoch(cfg, processor, seq_len=256, batch_size=2, seed=0, **kw):
    it = make_train_iterator(cfg, processor=processor, seq_len=seq_len, batch_size=batch_size, seed=seed,
                             num_epochs=1, **kw)
    batches, ids = [], []
    for batch in it:
        batches.append(batch)
        ids.append(it.last_batch_ids)
    return batches, ids, it.counters


def _samples_by_id(cfg, processor, split="train"):
    source = load_source(cfg, split)
    out = {}
    for i in range(len(source)):
        s = process_record(source[i], processor, rope_ids_for(processor))
        assert not isinstance(s, Skip), s
        out[s["id"]] = s
    return out


# ---------------------------------------------------------------------------------------------- toy builder
def test_toy_builder_records_and_labels(toy, tmp_path):
    """Records are built, decode, and every answer can be read back from its media by a simple detector."""
    source = load_source(toy, "train")
    assert len(source) == N_TRAIN and len(load_source(toy, "validation")) == N_VAL
    from omni_jax.data.pipeline import get_builder

    meta = get_builder(toy).info.metadata
    assert meta["overall_chance"] == pytest.approx(OVERALL_CHANCE)
    assert OVERALL_CHANCE == pytest.approx((1 / 4 + 1 / 4 + 1 / 2 + 1 / 7) / 4)
    seen = set()
    for i in range(len(source)):
        rec = records.decode_record(source[i])
        seen.add(rec["task"])
        assert rec["answer"] in CLASSES[rec["task"]]
        np.testing.assert_array_equal(rec["codec"], codec_pattern(rec["answer"]))
        paths = records.write_media(rec["media"], str(tmp_path))
        try:
            if rec["task"] == "colour":
                img = np.asarray(load_image(paths[0]).convert("RGB"), np.float64)
                bright = img[img.max(-1) > 120]  # the shape's pixels
                from omni_jax.data.toy_task import COLOURS

                mean = bright.mean(0)
                guess = min(COLOURS, key=lambda c: np.sum((np.asarray(COLOURS[c]) - mean) ** 2))
                assert guess == rec["answer"]
            elif rec["task"] == "beeps":
                wave = load_audio(paths[0])
                env = np.convolve(np.abs(wave), np.ones(160) / 160, mode="same") > 0.1
                assert int(np.sum(np.diff(env.astype(int)) == 1)) == CLASSES["beeps"].index(rec["answer"]) + 1
            elif rec["task"] == "motion":
                video = load_video(paths[0], load_audio_track=True)
                xs = [np.argmax(f.astype(np.float64).sum((0, 2))) for f in video.frames]
                assert ("right" if xs[-1] > xs[0] else "left") == rec["answer"]
                assert video.audio is not None and video.audio.shape[0] >= 16000 * 1.9
            else:
                assert rec["media"] == []
        finally:
            for p in paths:
                os.remove(p)
    assert seen == set(TASKS)


def test_toy_examples_are_deterministic():
    a, b, c = toy_example(6, "train", 0), toy_example(6, "train", 0), toy_example(6, "train", 1)
    assert a["media"] == b["media"] and a["conversation"] == b["conversation"]
    assert a["media"] != c["media"]
    assert toy_example(6, "validation", 0)["media"] != a["media"]


# ---------------------------------------------------------------------------------------------- JSONL builder
def _write_jsonl(folder):
    media = folder / "media"
    media.mkdir()
    write_image(media / "shape.png", 56, 56)
    write_wav(media / "speech.wav", 1.2)
    write_wav(media / "tiny.wav", 0.01)  # decodes, but too short for one audio token: skipped when processed
    write_video(media / "clip.mp4", 2.0, fps=4, width=56, height=56, audio_rate=16000, audio_channels=1)
    (media / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    user = lambda *parts: {"role": "user", "content": list(parts)}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    lines = [
        {"messages": [user({"type": "image", "image": "media/shape.png"}, text("What is it?")),
                      {"role": "assistant", "content": "A moving square."}]},
        {"messages": [user({"type": "audio", "audio": "media/speech.wav"}, text("Describe the sound.")),
                      {"role": "assistant", "content": [text("A chirp and a tone.")]}]},
        {"messages": [user({"type": "video", "video": "media/clip.mp4", "min_pixels": 3136, "max_pixels": 3136},
                           text("What happens?")),
                      {"role": "assistant", "content": "A square moves."}], "use_audio_in_video": True},
        {"messages": [user({"type": "image", "image": "media/missing.png"}, text("Hm?")),
                      {"role": "assistant", "content": "Nothing."}]},
        {"messages": [user({"type": "audio", "audio": "media/corrupt.wav"}, text("Hm?")),
                      {"role": "assistant", "content": "Noise."}]},
        {"messages": [user(text("Hello there."))]},
        "this line is not JSON",
        {"messages": [{"role": "system", "content": "Be brief."}, user(text("Two plus two?")),
                      {"role": "assistant", "content": "Four."}, user(text("And times three?")),
                      {"role": "assistant", "content": "\nTwelve, of course."}]},
        {"messages": [user({"type": "image", "image": "https://example.com/a.png"}, text("Hm?")),
                      {"role": "assistant", "content": "No."}]},
        {"messages": [user({"type": "audio", "audio": "media/tiny.wav"}, text("Hm?")),
                      {"role": "assistant", "content": "Silence."}]},
        {"messages": [user({"type": "image_url", "image_url": {"url": f"file://{media / 'shape.png'}"}},
                           text("And this?")),
                      {"role": "assistant", "content": "The same square."}]},
    ]
    path = folder / "train.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path, media


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl")
    path, media = _write_jsonl(folder)
    cfg = DataConfig(dataset="conversation_jsonl", data_dir=str(folder / "tfds"), config="unit",
                     jsonl={"train": str(path)}, shuffle=False, num_threads=1)
    return cfg, path, media


def test_jsonl_builder_skips_and_counts_bad_lines(jsonl_data, processor, caplog):
    cfg, path, media = jsonl_data
    with caplog.at_level(logging.WARNING):
        builder = build_dataset(cfg)
    report = builder.info.metadata["build_report"]["train"]
    assert report["lines"] == 11 and report["kept"] == 6
    assert report["skipped"] == {"bad_json": 1, "bad_conversation": 0, "no_assistant_turn": 1, "missing_media": 1,
                                 "corrupt_media": 1, "unsupported_media": 1}
    assert set(report["skipped"]) == set(SKIP_REASONS)
    assert "train.jsonl:4" in caplog.text and "missing.png" in caplog.text
    assert "train.jsonl:5" in caplog.text and "corrupt.wav" in caplog.text
    # Reloaded from disk: the metadata is stored with the dataset.
    from omni_jax.data.pipeline import get_builder

    assert get_builder(cfg).info.metadata["build_report"]["train"] == report

    # Self-contained: the pipeline works with the original media gone; the too-short clip is skipped there.
    shutil.rmtree(media)
    batches, ids, counters = _epoch(cfg, processor, seq_len=512, batch_size=2)
    assert counters["skipped_bad_media"] == 1 and counters["samples_packed"] == 5
    got = sorted(i for b in ids for row in b for i in row)
    assert got == ["train.jsonl:1", "train.jsonl:11", "train.jsonl:2", "train.jsonl:3", "train.jsonl:8"]
    keys = set().union(*batches)
    assert {"input_features", "pixel_values", "pixel_values_videos", "video_grid_thw"} <= keys


def test_loss_mask_covers_exactly_the_assistant_replies(jsonl_data, processor):
    cfg, _, _ = jsonl_data
    build_dataset(cfg)
    source = load_source(cfg, "train")
    recs = [source[i] for i in range(len(source))]
    multi = next(r for r in recs if records.decode_record(r)["id"] == "train.jsonl:8")
    s = process_record(multi, processor, rope_ids_for(processor))
    ids, mask = s["input_ids"], s["assistant_mask"]
    # The masked tokens are the two replies, each with its <|im_end|>, and nothing else.
    runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    assert len(runs) == 2
    tok = processor.tokenizer
    texts = [tok.decode(ids[r].tolist(), skip_special_tokens=False) for r in runs]
    # "\n" + "Twelve": the tokenizer merges the header newline with the reply's leading newline.
    assert texts == ["Four.<|im_end|>", "Twelve, of course.<|im_end|>"]
    assert all(ids[r[-1]] == IM_END_ID for r in runs)
    # In a batch: loss_mask marks positions whose *target* is an assistant token.
    batch = collate([[s]], seq_len=len(ids) + 5)
    n = len(ids)
    np.testing.assert_array_equal(batch["loss_mask"][0, :n - 1], mask[1:].astype(np.float32))
    assert batch["loss_mask"][0, n - 1:].sum() == 0 and int(batch["num_tokens"]) == int(mask[1:].sum())
    # Media placeholders in the image sample are never in the loss.
    img = next(r for r in recs if records.decode_record(r)["id"] == "train.jsonl:1")
    s_img = process_record(img, processor, rope_ids_for(processor))
    assert tok.decode(s_img["input_ids"][s_img["assistant_mask"]].tolist(),
                      skip_special_tokens=False) == "A moving square.<|im_end|>"


# ---------------------------------------------------------------------------------------------- packing
def test_packed_rows_equal_unpacked_samples(toy, processor):
    samples = _samples_by_id(toy, processor)
    batches, ids, counters = _epoch(toy, processor, seq_len=256, batch_size=2, talker=TALKER_LAYOUT)
    assert counters["samples_packed"] == N_TRAIN and counters["skipped_too_long"] == 0
    assert sum(len(row) > 1 for b in ids for row in b) > 0  # rows really hold several samples
    plain, plain_ids, _ = _epoch(toy, processor, seq_len=256, batch_size=2)  # no layout: no talker keys
    assert not any(k.startswith("talker") for b in plain for k in b)
    for batch, rows in zip(batches, ids):
        order = [samples[i] for row in rows for i in row]  # row-major segment order
        for b, row in enumerate(rows):
            seg = batch["segment_ids"][b]
            offset = 0
            for k, sid in enumerate(row, start=1):
                s = samples[sid]
                n = len(s["input_ids"])
                sl = slice(offset, offset + n)
                assert (seg[sl] == k).all()
                np.testing.assert_array_equal(batch["input_ids"][b, sl], s["input_ids"])
                np.testing.assert_array_equal(batch["positions"][:, b, sl], s["positions"])
                assert batch["positions"][0, b, offset] == 0  # positions restart per segment
                np.testing.assert_array_equal(batch["targets"][b, offset:offset + n - 1], s["input_ids"][1:])
                assert batch["targets"][b, offset + n - 1] == 0 and batch["loss_mask"][b, offset + n - 1] == 0
                np.testing.assert_array_equal(batch["loss_mask"][b, offset:offset + n - 1], s["assistant_mask"][1:])
                offset += n
            assert (seg[offset:] == 0).all() and (batch["input_ids"][b, offset:] == ENDOFTEXT_ID).all()
            assert batch["loss_mask"][b, offset:].sum() == 0 and (batch["positions"][:, b, offset:] == 0).all()
        assert int(batch["num_samples"]) == len(order)
        assert int(batch["num_tokens"]) == int(batch["loss_mask"].sum())
        # Media concatenated in segment order, F padded to the frame bucket with a zero mask.
        clips = [c for s in order for c in s["audio_features"]]
        if clips:
            feats, fmask = batch["input_features"], batch["feature_attention_mask"]
            assert len(feats) == len(clips) and feats.shape[2] % processor.audio_pad_to_multiple_of == 0
            for k, c in enumerate(clips):
                np.testing.assert_array_equal(feats[k, :, :c.shape[1]], c)
                assert fmask[k].sum() == c.shape[1] and not feats[k, :, c.shape[1]:].any()
        else:
            assert "input_features" not in batch
        for b, row in enumerate(rows):  # talker targets: each segment's codec pattern + end, in segment order
            loss_at = batch["talker_loss_mask"][b] > 0
            end = TALKER_LAYOUT.codec_end
            np.testing.assert_array_equal(batch["talker_targets"][b][loss_at], np.concatenate(
                [np.append(codec_pattern(samples[i]["answer"]), end) for i in row]))
            segs = batch["talker_segment_ids"][b][loss_at]
            np.testing.assert_array_equal(segs, np.repeat(np.arange(1, len(row) + 1), len(codec_pattern("x")) + 1))
            # the first loss position of a segment is its y_1 + codec bos, right after the speaker bos
            first = np.flatnonzero(loss_at & (np.diff(np.concatenate([[0], loss_at.astype(int)])) > 0))
            assert (batch["talker_thinker_ids"][b][first - 1] == TALKER_LAYOUT.speaker_bos).all()
            assert (batch["talker_codec_ids"][b][first] == TALKER_LAYOUT.codec_bos).all()
            # talker rows hold the prompt's H (+ E but at media placeholders) and never reach past the thinker row
            used = batch["talker_hidden_from"][b][batch["talker_hidden_from"][b] >= 0]
            assert (batch["segment_ids"][b][used] > 0).all()
            embed_from = batch["talker_embed_from"][b][batch["talker_embed_from"][b] >= 0]
            assert not np.isin(batch["input_ids"][b][embed_from], TALKER_LAYOUT.placeholder_ids).any()
        assert (batch["talker_hidden_from"] != batch["talker_embed_from"]).any()  # placeholders are in the prompts
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [s[key] for s in order if key in s]
            if parts:
                np.testing.assert_array_equal(batch[key], np.concatenate(parts))
            else:
                assert key not in batch


def test_talker_view_positions_follow_generation(toy, processor):
    """The talker view of every toy sample (image, audio, video with its audio track, text) against what
    generation computes (api.OmniModel._talk): rope_index(config=talker) over [prompt, speaker bos, y_1], then
    +1 per codec token; H at every prompt position, E except at media placeholders; a longer Lt only pads."""
    from omni_jax.config import TalkerConfig
    from omni_jax.data.talker_view import collate_talker, reply_span
    from omni_jax.processing.tmrope import rope_index

    source = load_source(toy, "train")
    talker_config = TalkerConfig()
    for i in range(len(source)):
        rec = records.decode_record(source[i])
        s = process_record(source[i], processor, rope_ids_for(processor))
        P, n = reply_span(s)
        m = len(s["codec"])
        assert n >= 2 and m == 12 and s["input_ids"][P + n - 1] == IM_END_ID
        length = P + 2 + m
        view = collate_talker([[s]], TALKER_LAYOUT)
        text_ids = np.concatenate([s["input_ids"][:P], [TALKER_LAYOUT.speaker_bos], s["input_ids"][P:P + 1]])
        audio = np.array([c.shape[1] for c in s["audio_features"]]) if s["audio_features"] else None
        positions, deltas = rope_index(text_ids[None], None, image_grid_thw=s.get("image_grid_thw"),
                                       video_grid_thw=s.get("video_grid_thw"), audio_seqlens=audio,
                                       video_second_per_grid=s.get("video_second_per_grid"),
                                       use_audio_in_video=rec["use_audio_in_video"], config=talker_config)
        first = P + 2 + int(deltas[0])
        expected = np.concatenate([positions[:, 0], np.broadcast_to(first + np.arange(m), (3, m))], axis=1)
        np.testing.assert_array_equal(view["talker_positions"][:, 0, :length], expected, err_msg=s["id"])
        assert (view["talker_positions"][:, 0, length:] == 0).all()
        assert (view["talker_segment_ids"][0] > 0).sum() == length
        np.testing.assert_array_equal(view["talker_hidden_from"][0, :P], np.arange(P))
        placeholder = np.isin(s["input_ids"][:P], TALKER_LAYOUT.placeholder_ids)
        assert placeholder.any() == (rec["task"] != "sum")
        np.testing.assert_array_equal(view["talker_embed_from"][0, :P], np.where(placeholder, -1, np.arange(P)))


def test_over_long_samples_are_skipped_and_counted(toy, processor):
    samples = _samples_by_id(toy, processor)
    L = 64
    too_long = sorted(i for i, s in samples.items() if len(s["input_ids"]) > L)
    assert too_long  # the motion samples (video + audio track) are longer than 64 tokens
    batches, ids, counters = _epoch(toy, processor, seq_len=L, batch_size=2)
    packed = {i for b in ids for row in b for i in row}
    assert counters["skipped_too_long"] == len(too_long) and not packed & set(too_long)
    assert packed == set(samples) - set(too_long)
    assert all(b["input_ids"].shape == (2, L) for b in batches)
    # With the talker view, a sample whose talker tokens (P + 2 + 12) exceed Lt is skipped the same way, and
    # every row's talker tokens fit Lt (the packer fits both lengths).
    from omni_jax.data.talker_view import talker_length

    Lt = 60
    layout = dataclasses.replace(TALKER_LAYOUT, seq_len=Lt)
    too_long = sorted(i for i, s in samples.items() if len(s["input_ids"]) > L or talker_length(s) > Lt)
    assert len(too_long) > len([i for i, s in samples.items() if len(s["input_ids"]) > L])
    batches, ids, counters = _epoch(toy, processor, seq_len=L, batch_size=2, talker=layout)
    assert counters["skipped_too_long"] == len(too_long)
    assert {i for b in ids for row in b for i in row} == set(samples) - set(too_long)
    for b, rows in zip(batches, ids):
        assert b["talker_targets"].shape == (2, Lt)
        for r, row in enumerate(rows):
            assert (b["talker_segment_ids"][r] > 0).sum() == sum(talker_length(samples[i]) for i in row) <= Lt
    # On the endless stream, a seq_len nothing fits in is an error, not an endless loop.
    it = make_train_iterator(toy, processor=processor, seq_len=16, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="in a row were skipped"):
        next(it)


def test_cached_samples_give_the_same_batches(toy, processor):
    def two_epochs(cfg):
        it = make_train_iterator(cfg, processor=processor, seq_len=256, batch_size=2, seed=0, num_epochs=2)
        return list(it), it.counters

    plain, _ = two_epochs(toy)
    cached, counters = two_epochs(DataConfig(**{**toy.__dict__, "cache_samples": True}))
    assert counters["samples_packed"] == 2 * N_TRAIN and len(plain) == len(cached)
    for a, b in zip(plain, cached):  # the second epoch comes from the cache
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_packing_off_gives_one_sample_per_row(toy, processor):
    cfg = DataConfig(**{**toy.__dict__, "packing": False})
    batches, ids, counters = _epoch(cfg, processor, seq_len=256, batch_size=4)
    assert all(len(row) <= 1 for b in ids for row in b) and counters["samples_packed"] == N_TRAIN
    assert all(b["segment_ids"].max() <= 1 for b in batches)


# ---------------------------------------------------------------------------------------------- order, shards, state
def _ids(cfg, processor, **kw):
    return [i for b in _epoch(cfg, processor, **kw)[1] for row in b for i in row]


def test_shuffle_is_deterministic_by_seed(toy, processor):
    a, b, c = (_ids(toy, processor, seed=s) for s in (0, 0, 1))
    assert a == b and sorted(a) == sorted(c) and a != c
    assert sorted(a) == sorted(f"omni_toy/train/{i}" for i in range(N_TRAIN))


def test_shards_are_disjoint_and_cover_the_set(toy, processor):
    shards = [_ids(toy, processor, shard_index=k, shard_count=3) for k in range(3)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == N_TRAIN
    with pytest.raises(ValueError, match="shard_index"):
        make_train_iterator(toy, processor=processor, seq_len=64, batch_size=1, seed=0, shard_index=3,
                            shard_count=3)


def test_iterator_state_restores_the_same_batches(toy, processor):
    def fresh():
        return make_train_iterator(toy, processor=processor, seq_len=160, batch_size=2, seed=3,  # endless
                                   talker=dataclasses.replace(TALKER_LAYOUT, seq_len=190))

    it = fresh()
    for _ in range(4):  # 20 samples, ~3-4 per batch: crosses into the second epoch soon after
        next(it)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # plain ints: fits grain's / Orbax's JSON checkpoint
    expected = [next(it) for _ in range(5)]
    assert all("talker_targets" in e for e in expected)
    expected_counters = dict(it.counters)
    it2 = fresh()
    it2.set_state(state)
    got = [next(it2) for _ in range(5)]
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            np.testing.assert_array_equal(e[k], g[k], err_msg=k)
    assert it2.counters == expected_counters
    assert expected_counters["samples_read"] > N_TRAIN  # the restored stretch crossed an epoch boundary


# ---------------------------------------------------------------------------------------------- eval examples
def test_eval_examples_prompt_without_the_answer(toy, processor):
    examples = make_eval_examples(toy, split="validation", limit=N_VAL)
    assert len(examples) == N_VAL and {e["task"] for e in examples} == set(TASKS)
    source = load_source(toy, "validation")
    for i, ex in enumerate(examples):
        assert ex["conversation"][-1]["role"] == "user" and ex["answer"] in CLASSES[ex["task"]]
        batch = processor([ex["conversation"]], use_audio_in_video=ex["use_audio_in_video"])
        text = processor.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
        assert text.endswith("<|im_start|>assistant\n") and ex["answer"] not in text.split("user\n")[-1]
        # Inline media give the same features as the stored files.
        stored = process_record(source[i], processor, rope_ids_for(processor))
        for key in ("pixel_values", "pixel_values_videos", "video_grid_thw"):
            if key in stored:
                np.testing.assert_array_equal(batch[key], stored[key])
        if stored["audio_features"]:
            c = stored["audio_features"][0]
            np.testing.assert_array_equal(batch["input_features"][0, :, :c.shape[1]], c)


# ---------------------------------------------------------------------------------------------- through the Thinker
def test_packed_batch_runs_through_the_thinker_like_unpacked(toy, processor):
    """A packed multimodal batch feeds the tiny Thinker; each segment's logits equal the sample run alone."""
    import flax.linen as nn

    from omni_jax.config import OmniConfig, RuntimeOptions
    from omni_jax.data.thinker_batch import packed_thinker_inputs
    from omni_jax.models.thinker import Thinker, init_thinker
    from omni_jax.sharding import rules_context

    config = OmniConfig.from_yaml(os.path.join(REPO, "configs/models/tiny.yaml")).thinker
    thinker = Thinker(config, RuntimeOptions())
    params = nn.meta.unbox(jax.jit(lambda r: init_thinker(thinker, r))(jax.random.key(0)))["params"]

    @jax.jit
    def logits_fn(params, ids, positions, segment_ids, multimodal):
        with rules_context():
            return thinker.apply({"params": params}, ids, positions, segment_ids, **multimodal).logits

    samples = _samples_by_id(toy, processor)
    batches, ids, _ = _epoch(toy, processor, seq_len=256, batch_size=2)
    # The batch with the most modalities (audio, image and video together).
    k = max(range(len(batches)), key=lambda j: sum(key in batches[j] for key in
                                                   ("input_features", "pixel_values", "pixel_values_videos")))
    batch, rows = batches[k], ids[k]
    packed = np.asarray(logits_fn(params, *packed_thinker_inputs(batch, config)))
    assert np.isfinite(packed).all()
    row = max(range(len(rows)), key=lambda r: len(rows[r]))
    offset = 0
    for sid in rows[row]:
        alone = collate([[samples[sid]]], seq_len=256)
        single = np.asarray(logits_fn(params, *packed_thinker_inputs(alone, config)))
        n = len(samples[sid]["input_ids"])
        # float32, same model and positions; only the attention mask and the encoder batch differ.
        np.testing.assert_allclose(packed[row, offset:offset + n], single[0, :n], atol=1e-4, rtol=1e-4)
        offset += n

    # One image's features missing: the placeholder count check names the mismatch.
    assert "pixel_values" in batch
    grid = batch["image_grid_thw"]
    broken = {**batch, "image_grid_thw": grid[:-1], "pixel_values": batch["pixel_values"][:-int(np.prod(grid[-1]))]}
    with pytest.raises(ValueError, match="image placeholder tokens"):
        packed_thinker_inputs(broken, config)
