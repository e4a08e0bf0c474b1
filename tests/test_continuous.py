"""The continuous-batching engine (serve/continuous.py) on a tiny random Qwen2.5-Omni with speech: greedy replies
equal HF whatever the order and mix, sampled and spoken replies reproducible per request,
chunked prefill, preemption, stop strings and stop token ids, bad requests, compiled shapes, and a sharded engine
equal to one device."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniForConditionalGeneration

from media import write_image, write_video, write_wav
from omni_jax.api import OmniModel
from omni_jax.processing.processor import Processor
from served_model import build_model_dir, collect, user
from serve.continuous import ContinuousEngine

# A small engine that exercises every mechanism on short prompts: fewer slots than requests (admission while
# others decode), 4-token pages (rows span many pages), 16-token prefill chunks and budget (prompts of 20-90
# tokens are prefilled over several steps, interleaved with decode steps).
SMALL = dict(max_slots=3, page_size=4, chunk_size=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("omni_tiny"), max_positions=1024)  # room for the video prompt


@pytest.fixture(scope="module")
def served(model_dir):
    return OmniModel.from_pretrained(model_dir), Processor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    write_image(folder / "img.png", 56, 84)
    write_wav(folder / "clip.wav", 1.5)
    write_video(folder / "clip.mp4", 1.0, fps=4, width=56, height=56, audio_rate=16000, audio_channels=1)
    return folder


def _requests(media):
    return [
        {"id": "short", "messages": user("Hi"), "max_new_tokens": 12},
        {"id": "long", "messages": user("Tell me a story about " + "a cat and a dog " * 6), "max_new_tokens": 7},
        {"id": "image", "messages": user({"type": "image", "image": str(media / "img.png")}, "What is this?"),
         "max_new_tokens": 9},
        {"id": "audio", "messages": user({"type": "audio", "audio": str(media / "clip.wav")}, "Transcribe."),
         "max_new_tokens": 10},
        {"id": "video", "messages": user({"type": "video", "video": str(media / "clip.mp4")}, "What happens?"),
         "max_new_tokens": 6, "use_audio_in_video": True},
        {"id": "two", "messages": user("One more question, a bit longer than the first one"), "max_new_tokens": 5},
    ]


def _serve(engine, requests):
    deltas, chunks, finished, failed = collect(engine.serve(requests))
    assert not failed, failed
    for rid, event in finished.items():  # streamed text adds up to the final text
        assert deltas.get(rid, "") == event.text, rid
    return finished, chunks


def _hf_greedy(hf, processor, request, steps):
    batch = processor([request["messages"]], use_audio_in_video=request.get("use_audio_in_video", False))
    tensors = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        out = hf.thinker.generate(**tensors, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                  pad_token_id=151643, use_audio_in_video=request.get("use_audio_in_video", False))
    return out[0, batch["input_ids"].shape[1]:].tolist()


def test_greedy_equals_hf_in_any_order_and_stops_end_rows(served, media, model_dir):
    model, processor = served
    requests = _requests(media)
    runs = []
    for seed in (0, 1):
        order = list(requests)
        random.Random(seed).shuffle(order)
        engine = ContinuousEngine(model, processor, **SMALL)
        finished, _ = _serve(engine, order)
        runs.append(finished)
        assert engine.allocator.pages_in_use == 0  # every page returned
        assert engine.stats["prefill_tokens"] > 16 * len(requests) / 2  # prompts went through several chunks
    tokens = {k: v.token_ids for k, v in runs[0].items()}
    assert tokens == {k: v.token_ids for k, v in runs[1].items()}
    hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for request in requests:
        assert tokens[request["id"]] == _hf_greedy(hf, processor, request, request["max_new_tokens"]), request["id"]

    # stop token ids end a reply at the id's first occurrence (kept in token_ids); a stop string cuts the text
    # before it (not included); both give finish_reason "stop"
    stopped = [dict(r, stop_token_ids=[tokens[r["id"]][2 + i % 3]]) for i, r in enumerate(requests)]
    text = runs[0]["short"].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    stopped.append(dict(requests[0], id="stop-string", stop=[stop, "never in a reply"]))
    finished, _ = _serve(ContinuousEngine(model, processor, **SMALL), stopped)
    for r in stopped[:-1]:
        full = tokens[r["id"]]
        assert finished[r["id"]].token_ids == full[: full.index(r["stop_token_ids"][0]) + 1]
        assert finished[r["id"]].finish_reason == "stop"
    assert finished["stop-string"].text == text[: text.find(stop)]
    assert finished["stop-string"].finish_reason == "stop"


def test_sampled_and_spoken_replies_do_not_depend_on_the_mix(served, media):
    model, processor = served
    sampled = {"id": "sampled", "messages": user("Say something"), "max_new_tokens": 10, "temperature": 0.9,
               "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 7}
    spoken = {"id": "spoken", "messages": user("Speak, please"), "max_new_tokens": 6, "return_audio": True,
              "seed": 3, "talker": {"max_new_tokens": 40}}
    alone = {}
    for request in (sampled, spoken):
        finished, chunks = _serve(ContinuousEngine(model, processor, **SMALL), [request])
        alone[request["id"]] = finished[request["id"]], chunks.get(request["id"], [])
    mixed, chunks = _serve(ContinuousEngine(model, processor, **SMALL),
                           _requests(media)[:3] + [sampled, dict(sampled, id="other-seed", seed=8), spoken])
    assert mixed["sampled"].token_ids == alone["sampled"][0].token_ids
    assert mixed["other-seed"].token_ids != mixed["sampled"].token_ids  # the seed matters
    assert mixed["spoken"].token_ids == alone["spoken"][0].token_ids
    audio = mixed["spoken"].audio
    assert audio is not None and audio.size > 0
    np.testing.assert_array_equal(audio, alone["spoken"][0].audio)
    assert len(chunks["spoken"]) >= 1
    np.testing.assert_array_equal(np.concatenate([c.audio for c in chunks["spoken"]]), audio)
    # the greedy thinker reply of a spoken request is the one generate() gives for it alone, and so is its speech
    batch = processor([spoken["messages"]])
    ref = model.generate(batch, max_new_tokens=6, return_audio=True, seed=3, talker={"max_new_tokens": 40},
                         on_audio=lambda row, chunk: None)
    assert mixed["spoken"].token_ids == ref.generated[0].tolist()
    # float32 rounding only: the engine's thinker hidden states come from the paged cache (gathered pages, another
    # summation order than generate()'s contiguous cache), and the talker and Token2Wav carry that through
    np.testing.assert_allclose(audio, ref.audio[0], rtol=0, atol=1e-6)


def test_a_full_page_pool_preempts_and_replays_exactly(served, media):
    model, processor = served
    requests = [dict(r, max_new_tokens=16) for r in _requests(media)[:3]]
    roomy, _ = _serve(ContinuousEngine(model, processor, **SMALL), requests)
    # 3 slots of 20-90 tokens need up to ~45 pages of 4; 30 force preemptions and still hold the longest row alone
    engine = ContinuousEngine(model, processor, **dict(SMALL, kv_pages=30))
    tight, _ = _serve(engine, requests)
    assert engine.stats["preemptions"] > 0
    assert {k: v.token_ids for k, v in tight.items()} == {k: v.token_ids for k, v in roomy.items()}
    assert engine.allocator.pages_in_use == 0
    # pages in use never exceed the tokens held by more than one partly filled page per row
    for pages, tokens in engine.page_samples:
        assert pages * engine.page_size < tokens + engine.max_slots * engine.page_size


def test_bad_requests_fail_alone_with_the_reason(served, media):
    model, processor = served
    good = _requests(media)[:2]
    bad = [
        {"id": "missing-file", "messages": user({"type": "image", "image": str(media / "nope.png")}, "?")},
        {"id": "voice", "messages": user("Hi"), "return_audio": True, "speaker": "Nobody"},
        {"id": "too-long", "messages": user("word " * 1100), "max_new_tokens": 4},
        {"id": "bad-field", "messages": user("Hi"), "temperature": -1},
    ]
    engine = ContinuousEngine(model, processor, **SMALL)
    deltas, chunks, finished, failed = collect(engine.serve(good + bad))
    assert set(finished) == {"short", "long"}
    assert set(failed) == {"missing-file", "voice", "too-long", "bad-field"}
    assert "nope.png" in failed["missing-file"]
    assert "Nobody" in failed["voice"]
    assert "prompt too long" in failed["too-long"]
    assert "temperature" in failed["bad-field"]


def test_compiled_shapes_are_bounded(served):
    model, processor = served
    engine = ContinuousEngine(model, processor, max_slots=4, page_size=8, chunk_size=64)
    requests = [{"id": f"r{i}", "messages": user("x " * (3 * i + 1)), "max_new_tokens": 2 + (5 * i) % 23}
                for i in range(8)]
    finished, _ = _serve(engine, requests)
    assert len(finished) == 8
    # one decode program per page-table width bucket (powers of two), prefill per chunk bucket (16, 32, 64)
    assert len(engine.decode_shapes) <= 3, engine.decode_shapes
    assert engine.prefill_shapes <= {16, 32, 64}, engine.prefill_shapes


def test_sharded_engine_equals_single_device(served, media, model_dir):
    """Slots and the page pool split over fsdp (each shard its own pages), kv heads over tensor, on the 8 virtual
    devices (4 x 2): the same greedy replies as one device."""
    model, processor = served
    sharded = OmniModel.from_pretrained(model_dir, mesh_shape={"fsdp": 4, "tensor": 2})
    requests = _requests(media)[:3]
    results = []
    for m in (model, sharded):
        engine = ContinuousEngine(m, processor, **SMALL)
        finished, _ = _serve(engine, requests)
        results.append({k: v.token_ids for k, v in finished.items()})
        assert engine.max_slots == (4 if m is sharded else 3)  # rounded up to the 4 row shards
    assert results[0] == results[1]
