"""omni_toy questions as eval requests: they parse as requests, their media decode, and scoring counts right."""
from __future__ import annotations

import json

from omni_jax.data.toy_requests import score, write_requests
from omni_jax.data.toy_task import toy_example
from omni_jax.processing import write_qwen_tokenizer
from omni_jax.processing.processor import Processor
from serve.requests import read_requests


def test_requests_parse_and_score(tmp_path):
    requests_path, answers_path = write_requests(str(tmp_path), num=8)
    requests = list(read_requests(requests_path, base_dir=str(tmp_path)))
    assert all(not isinstance(r, Exception) for r in requests), requests
    assert [r.id for r in requests] == [f"omni_toy-validation-{i}" for i in range(8)]
    # the media written beside the requests are the dataset's, and the processor reads them
    processor = Processor.from_pretrained(write_qwen_tokenizer(tmp_path / "tok"))
    for request in requests[:4]:  # one per task: image, audio, video with its audio track, text
        batch = processor([request.messages], use_audio_in_video=request.use_audio_in_video, base_dir=str(tmp_path))
        assert batch["input_ids"].shape[0] == 1
    assert "input_features" in processor([requests[1].messages], base_dir=str(tmp_path))

    answers = [json.loads(line) for line in open(answers_path)]
    assert [a["answer"] for a in answers] == [toy_example(i, "validation")["answer"] for i in range(8)]
    outputs = tmp_path / "out.jsonl"
    with open(outputs, "w") as f:
        for k, a in enumerate(answers[:7]):  # the last one is missing
            text = a["answer"].capitalize() + "." if k % 2 == 0 else "nope"
            f.write(json.dumps({"id": a["id"], "text": text, "error": None}) + "\n")
    result = score(answers_path, str(outputs))
    assert result["num"] == 7 and result["missing"] == [answers[7]["id"]]
    assert abs(result["accuracy"] - 4 / 7) < 1e-12
    assert abs(result["chance"] - 0.2857) < 1e-3
