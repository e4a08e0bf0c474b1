"""The serving engine (serve/engine.py) on a tiny random Qwen2.5-Omni with speech: batching, streaming, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

from hf_models import randomize_
from media import write_image, write_wav
from omni_jax.api import OmniModel
from omni_jax.config import OmniConfig
from omni_jax.generation import bucket_length
from omni_jax.processing.processor import Processor
from omni_jax.processing.tokenizer import write_qwen_tokenizer
from serve.engine import AudioChunk, Engine, Failed, Finished, TextDelta

SPEAKER_BOS = {"Chelsie": 151870, "Ethan": 151871}
MAX_POSITIONS = 256  # a short context so that a "prompt too long" request is cheap to write


def build_model_dir(path, max_positions: int = MAX_POSITIONS) -> str:
    """An HF Qwen2.5-Omni directory (thinker, talker, token2wav, two voices, tokenizer) with random weights."""
    cfg = OmniConfig.from_yaml("configs/models/tiny.yaml").to_hf_config()
    cfg["thinker_config"]["text_config"]["max_position_embeddings"] = max_positions
    hf_cfg = Qwen2_5OmniConfig(**cfg)
    torch.manual_seed(0)
    hf = randomize_(Qwen2_5OmniForConditionalGeneration(hf_cfg), seed=1).eval()
    with torch.no_grad():  # a random talker must not pick codes past the DiT's table (see test_speech)
        hf.talker.codec_head.weight[hf_cfg.token2wav_config.dit_config.num_embeds:] = 0.0
    gen = torch.Generator().manual_seed(5)
    speakers = {name: {"cond": torch.randn(192, generator=gen), "ref_mel": torch.randn(1, 60, 80, generator=gen),
                       "bos_token": bos} for name, bos in SPEAKER_BOS.items()}
    hf.save_pretrained(path)
    torch.save(speakers, path / "spk_dict.pt")
    write_qwen_tokenizer(path)
    return str(path)


def user(*parts):
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("omni_tiny"))


@pytest.fixture(scope="module")
def served(model_dir):
    return OmniModel.from_pretrained(model_dir), Processor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    write_image(folder / "img.png", 56, 84)
    write_wav(folder / "clip.wav", 1.5)
    return folder


def _collect(events):
    deltas, chunks, finished, failed = {}, {}, {}, {}
    for ev in events:
        if isinstance(ev, TextDelta):
            deltas[ev.id] = deltas.get(ev.id, "") + ev.text
        elif isinstance(ev, AudioChunk):
            chunks.setdefault(ev.id, []).append(ev)
        elif isinstance(ev, Finished):
            finished[ev.id] = ev
        else:
            assert isinstance(ev, Failed)
            failed[ev.id] = ev.error
    return deltas, chunks, finished, failed


def _text_requests(media):
    return [
        {"id": "short", "messages": user("Hi"), "max_new_tokens": 12},
        {"id": "long", "messages": user("Tell me a story about " + "a cat and a dog " * 6), "max_new_tokens": 7},
        {"id": "image", "messages": user({"type": "image", "image": "img.png"}, "What is this?"),
         "max_new_tokens": 9},
        {"id": "audio", "messages": user({"type": "audio", "audio": "clip.wav"}, "Transcribe."),
         "max_new_tokens": 10},
        {"id": "sampled", "messages": user("Say something"), "max_new_tokens": 8, "temperature": 0.8,
         "top_k": 50, "top_p": 0.9, "seed": 3},
    ]


def test_batched_equals_one_by_one_and_stream_equals_final(served, media):
    model, processor = served
    requests = _text_requests(media)
    batched = Engine(model, processor, max_batch=8, stream=True, stream_every=3)
    deltas, _, finished, failed = _collect(batched.serve(requests, base_dir=str(media)))
    assert not failed, failed
    assert set(finished) == {r["id"] for r in requests}
    # The four greedy requests shared one batch (different lengths and modalities, left padded).
    assert {finished[i].timings["batch_size"] for i in ("short", "long", "image", "audio")} == {4}
    for r in requests:
        done = finished[r["id"]]
        assert len(done.token_ids) <= r["max_new_tokens"]
        assert done.finish_reason in ("stop", "length")
        assert done.text == processor.tokenizer.decode(done.token_ids, skip_special_tokens=True)
        assert deltas.get(r["id"], "") == done.text, r["id"]  # streamed text adds up to the final text

    alone = {}
    for r in requests:  # one request per batch, no streaming
        one = Engine(model, processor, max_batch=1, stream=False)
        _, _, fin, fail = _collect(one.serve([r], base_dir=str(media)))
        assert not fail
        alone[r["id"]] = fin[r["id"]].token_ids
    for r in requests:
        assert finished[r["id"]].token_ids == alone[r["id"]], r["id"]
    # The engine's own reference: a request's greedy tokens equal model.generate on it alone.
    batch = processor([requests[0]["messages"]])
    out = model.generate(batch, max_new_tokens=12)
    assert finished["short"].token_ids == [int(t) for t in out.generated[0]]


def test_bad_requests_fail_alone(served, media):
    model, processor = served
    engine = Engine(model, processor, max_batch=4)
    requests = [
        {"id": "ok", "messages": user("Hello there"), "max_new_tokens": 5},
        {"id": "missing", "messages": user({"type": "image", "image": "nope.png"}, "?")},
        {"id": "speaker", "messages": user("Hi"), "return_audio": True, "speaker": "Nobody"},
        {"id": "too_long", "messages": user("word " * 300), "max_new_tokens": 4},
        {"id": "unknown_field", "messages": user("Hi"), "max_tokens": 5},
        {"id": "bad_temperature", "messages": user("Hi"), "temperature": -1},
        {"id": "corrupt", "messages": user({"type": "audio", "audio": "img.png"}, "?")},
    ]
    _, _, finished, failed = _collect(engine.serve(requests, base_dir=str(media)))
    assert set(finished) == {"ok"}
    assert "file not found: 'nope.png'" in failed["missing"]
    assert "unknown speaker 'Nobody'" in failed["speaker"] and "Chelsie" in failed["speaker"]
    assert "prompt too long" in failed["too_long"] and f"{MAX_POSITIONS} positions" in failed["too_long"]
    assert "unknown field 'max_tokens'" in failed["unknown_field"]
    assert "temperature must be a number >= 0" in failed["bad_temperature"]
    assert "img.png" in failed["corrupt"]


def test_speech_request_streams_audio(served):
    model, processor = served
    engine = Engine(model, processor)
    request = {"id": "talk", "messages": user("Say hi"), "max_new_tokens": 6, "return_audio": True,
               "speaker": "Ethan", "talker": {"max_new_tokens": 24, "do_sample": False}}
    deltas, chunks, finished, failed = _collect(engine.serve([request]))
    assert not failed, failed
    done = finished["talk"]
    assert done.audio is not None and done.audio.dtype == np.float32 and done.audio.size > 0
    pieces = chunks["talk"]
    assert [c.index for c in pieces] == list(range(len(pieces)))
    np.testing.assert_array_equal(np.concatenate([c.audio for c in pieces]), done.audio)
    assert deltas["talk"] == done.text


def test_compiled_shapes_are_bounded(served):
    model, processor = served
    engine = Engine(model, processor, max_batch=4, stream=False)
    before = set(model.generate_shapes)
    # 12 text requests of different lengths and batch sizes 4, 4, 4 (and max_new_tokens 3..8 -> bucket 16):
    requests = [{"id": f"r{i}", "messages": user("x " * (i + 1)), "max_new_tokens": 3 + i % 6} for i in range(12)]
    _, _, finished, failed = _collect(engine.serve(requests))
    assert not failed and len(finished) == 12
    new = model.generate_shapes - before
    # Batches of 4 in submission order, all with max_new_tokens bucket 16: one shape per prompt-length bucket.
    lengths = [processor([r["messages"]])["input_ids"].shape[1] for r in requests]
    buckets = {bucket_length(max(lengths[i:i + 4])) for i in range(0, 12, 4)}
    assert {f.timings["padded_batch_size"] for f in finished.values()} == {4}
    assert len(new) == len(buckets) <= 2, new
    # A 3-request tail is padded to the batch bucket 4: still no new shape.
    _, _, finished, _ = _collect(engine.serve(requests[:3]))
    assert len(finished) == 3 and model.generate_shapes - before == new


def test_sharded_engine_equals_single_device(served, media, model_dir):
    """Data x tensor parallel serving (4 x 2 on the 8 virtual devices): batches of 3 are padded to a multiple of
    the data axis; the greedy answers equal the single-device engine's."""
    model, processor = served
    sharded = OmniModel.from_pretrained(model_dir, mesh_shape={"data": 4, "tensor": 2})
    requests = [r for r in _text_requests(media) if r["id"] != "sampled"][:3]
    results = []
    for m in (model, sharded):
        _, _, finished, failed = _collect(Engine(m, processor, max_batch=3, stream=False)
                                          .serve(requests, base_dir=str(media)))
        assert not failed, failed
        results.append({k: v.token_ids for k, v in finished.items()})
        assert all(f.timings["padded_batch_size"] == (4 if m is sharded else 3) for f in finished.values())
    assert results[0] == results[1]
