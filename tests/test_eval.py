"""`omni-jax eval`: JSONL requests in, JSONL records out; bad requests get error records; killed and resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile

from media import write_image, write_wav
from serve.eval import read_done, run_eval
from served_model import MAX_POSITIONS, build_model_dir, user

GOOD = {
    "plain": {"messages": user("Hello, who are you?"), "max_new_tokens": 6},
    "system": {"messages": [{"role": "system", "content": "Be brief."}] + user("What is 2+2?"),
               "max_new_tokens": 5},
    "image": {"messages": user({"type": "image", "image": "media/img.png"}, "Describe it."), "max_new_tokens": 7},
    "audio": {"messages": user({"type": "audio", "audio": "media/clip.wav"}, "What do you hear?"),
              "max_new_tokens": 4},
    "longer": {"messages": user("Count: " + "one two three " * 8), "max_new_tokens": 8},
    "sampled": {"messages": user("Surprise me"), "max_new_tokens": 6, "temperature": 0.7, "top_p": 0.9, "seed": 1},
}
BAD = {  # id -> (request fields, words the error must contain)
    "missing_file": ({"messages": user({"type": "image", "image": "media/missing.png"}, "?")},
                     ["file not found", "media/missing.png"]),
    "bad_speaker": ({"messages": user("Hi"), "return_audio": True, "speaker": "Nobody"},
                    ["unknown speaker 'Nobody'", "Chelsie", "Ethan"]),
    "too_long": ({"messages": user("word " * 300), "max_new_tokens": 4},
                 ["prompt too long", f"{MAX_POSITIONS} positions"]),
}
MALFORMED = '{"id": "broken", "messages": [{"role": "user", "content": "unterminated'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = build_model_dir(root / "model")
    (root / "media").mkdir()
    write_image(root / "media" / "img.png", 56, 56)
    write_wav(root / "media" / "clip.wav", 1.0)
    lines = []
    for rid, fields in list(GOOD.items())[:3] + [("missing_file", BAD["missing_file"][0])] + \
            list(GOOD.items())[3:] + [(k, v[0]) for k, v in BAD.items() if k != "missing_file"]:
        lines.append(json.dumps({"id": rid, **fields}))
    lines.insert(5, MALFORMED)
    lines.append(json.dumps({"id": "plain", "messages": user("duplicate id")}))
    requests = root / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    return model, requests, root


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _check(records: list[dict], root) -> dict:
    by_id = {}
    for r in records:
        key = r["id"] if r["id"] is not None else f"line {r['line']}"
        assert key not in by_id, f"{key} has two records"
        by_id[key] = r
    assert set(by_id) == set(GOOD) | set(BAD) | {"line 6", "line 11"}
    for rid, fields in GOOD.items():
        r = by_id[rid]
        assert r["error"] is None, r
        assert 1 <= len(r["token_ids"]) <= fields["max_new_tokens"] and isinstance(r["text"], str)
        assert r["finish_reason"] in ("stop", "length") and r["audio"] is None
        assert r["timings"]["new_tokens"] == len(r["token_ids"]) and r["timings"]["total"] > 0
    for rid, (_, words) in BAD.items():
        r = by_id[rid]
        assert r["text"] is None and r["token_ids"] is None
        for w in words:
            assert w in r["error"], (rid, r["error"])
    assert "not valid JSON" in by_id["line 6"]["error"]
    assert "duplicate id 'plain'" in by_id["line 11"]["error"]
    return by_id


@pytest.fixture(scope="module")
def in_process_run(setup, tmp_path_factory):
    """One in-process run over all requests: (its summary, its output file). The killed-and-resumed CLI run is
    compared with it."""
    model, requests, _ = setup
    out = tmp_path_factory.mktemp("eval_in_process") / "out.jsonl"
    return run_eval(model, str(requests), str(out), progress=False), out


def test_eval_answers_good_requests_and_reports_bad_ones(setup, in_process_run):
    model, requests, root = setup
    summary, out = in_process_run
    assert summary["answered"] == len(GOOD) and summary["errors"] == len(BAD) + 2 and summary["skipped"] == 0
    _check(_records(out), root)
    # Re-running skips everything already answered (and the error records): nothing is appended.
    size = out.stat().st_size
    again = run_eval(model, str(requests), str(out), progress=False)
    assert again["answered"] == again["errors"] == 0 and again["skipped"] == len(GOOD) + len(BAD) + 2
    assert out.stat().st_size == size


def _cli(model, requests, out, extra=()):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "omni_jax", "eval", "--model", model, "--requests", str(requests), "--out", str(out),
           "--max-batch", "1", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_without_redoing_or_losing_records(setup, in_process_run, tmp_path):
    model, requests, root = setup
    out = tmp_path / "out.jsonl"
    proc = _cli(model, requests, out)
    deadline = time.time() + 600
    answered = lambda: sum(1 for r in _records(out) if r["error"] is None) if out.exists() else 0  # noqa: E731
    while answered() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"eval ended before it could be killed:\n{proc.communicate()[1][-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _records(out)
    done_before = {r["id"] for r in before if r["error"] is None}
    assert 2 <= len(done_before) < len(GOOD), "the kill should land half-way"
    with open(out, "a") as f:  # what a crash in the middle of a write would leave
        f.write('{"id": "longer", "text": "half a rec')
    assert read_done(str(out))[0] == {r["id"] for r in before if r["id"]}  # and the partial line is cut off

    proc = _cli(model, requests, out, ["--no-progress"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    after = _records(out)
    assert after[: len(before)] == before  # nothing rewritten
    by_id = _check(after, root)
    # Resumed run with batches of 1 gives the same greedy answers as the batched in-process run.
    ref_ids = {r["id"]: r["token_ids"] for r in _records(in_process_run[1]) if r["error"] is None}
    for rid in GOOD:
        if GOOD[rid].get("temperature", 0) == 0:
            assert by_id[rid]["token_ids"] == ref_ids[rid], rid
    assert "already done" in err


def test_speech_request_writes_a_wav(setup, tmp_path):
    model, _, root = setup
    requests = tmp_path / "speech.jsonl"
    requests.write_text(json.dumps({"id": "talk/1", "messages": user("Say hi"), "max_new_tokens": 4,
                                    "return_audio": True, "speaker": "Chelsie",
                                    "talker": {"max_new_tokens": 16, "do_sample": False}}) + "\n")
    out = tmp_path / "speech_out.jsonl"
    summary = run_eval(model, str(requests), str(out), audio_dir=str(tmp_path / "wavs"), progress=False)
    assert summary["answered"] == 1, _records(out)
    (record,) = _records(out)
    wave, rate = soundfile.read(record["audio"], dtype="float32")
    assert rate == 24000 and wave.size > 0 and os.path.dirname(record["audio"]) == str(tmp_path / "wavs")


def test_two_process_eval_matches_one_process_and_resumes(setup, tmp_path):
    """Multi-host eval: two processes (jax.distributed, gloo CPU collectives, one device each) run
    `omni-jax eval --distributed --mesh data=2`; each feeds its half of every batch, process 0 writes the
    records. Process 0's output already holds two records (an earlier run killed there) and process 1 sees no
    output file at all (another host): both skip what process 0 has, and the file ends with the same records
    (greedy and seeded-sampled tokens, errors) as one process on one device, none twice."""
    import socket

    model, _, root = setup
    keep = ["plain", "image", "audio", "sampled"]
    lines = [json.dumps({"id": rid, **GOOD[rid]}) for rid in keep]
    lines.insert(2, json.dumps({"id": "missing_file", **BAD["missing_file"][0]}))
    requests = root / "two_process.jsonl"  # media paths resolve against the requests file's folder
    requests.write_text("\n".join(lines) + "\n")
    ref = tmp_path / "one.jsonl"
    run_eval(model, str(requests), str(ref), max_batch=4, progress=False)
    want = {r["id"]: r for r in _records(ref)}
    out = tmp_path / "two.jsonl"
    earlier = [want["missing_file"], want["image"]]
    out.write_text("".join(json.dumps(r) + "\n" for r in earlier))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i, path in enumerate([out, tmp_path / "host1" / "two.jsonl"]):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        cmd = [sys.executable, "-m", "omni_jax", "eval", "--model", model, "--requests", str(requests), "--out",
               str(path), "--max-batch", "4", "--distributed", "--mesh", "data=2", "--no-progress"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
        errs.append(err)
    assert "3 answered, 0 errors, 2 already done" in errs[0], errs[0][-2000:]
    assert not (tmp_path / "host1").exists()  # process 1 writes nothing
    records = _records(out)
    assert records[:2] == earlier and len(records) == len(want)
    got = {r["id"]: r for r in records}
    assert set(got) == set(want) == set(keep) | {"missing_file"}
    for rid in keep:
        assert got[rid]["error"] is None and got[rid]["token_ids"] == want[rid]["token_ids"], rid
        assert got[rid]["text"] == want[rid]["text"]
    assert "file not found" in got["missing_file"]["error"]
