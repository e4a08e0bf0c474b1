"""`omni-jax serve` started on 127.0.0.1 in a subprocess, driven by the official `openai` client: text, streamed and
spoken replies, concurrent requests, 400s naming the field while other requests succeed, a short request that
overtakes a long one, a client that disconnects mid-stream, and a graceful shutdown with a request in flight."""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import soundfile

from media import write_image
from served_model import build_model_dir

GREEDY = dict(temperature=0, max_tokens=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: str, port: int, log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "omni_jax", "serve", "--model", model_dir, "--port", str(port), "--max-slots", "4",
           "--served-model-name", "tiny-omni", "--max-audio-tokens", "60"]  # the random talker never ends
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _wait_ready(port: int, proc: subprocess.Popen, log_path, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(open(log_path).read()[-3000:])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model_dir = build_model_dir(root / "model", max_positions=1024)
    write_image(root / "img.png", 56, 84)
    port = _free_port()
    log_path = root / "server.log"
    proc = _start(model_dir, port, log_path)
    try:
        _wait_ready(port, proc, log_path)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        yield client, port, root, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ask(client, text, **kwargs):
    return client.chat.completions.create(model="tiny-omni", messages=[{"role": "user", "content": text}],
                                          **{**GREEDY, **kwargs})


def test_models_text_and_streamed_replies(server):
    client, port, root, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny-omni"]
    reply = _ask(client, "Hello there")
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 0
    text = reply.choices[0].message.content
    assert text
    stream = client.chat.completions.create(model="tiny-omni", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Hello there"}], **GREEDY)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text  # the stream adds up to the same greedy reply
    assert finish == "length" and usage.completion_tokens == 8
    # an image as a data URL, and as a local path: the same reply
    data = base64.b64encode((root / "img.png").read_bytes()).decode()
    replies = []
    for url in (f"data:image/png;base64,{data}", str(root / "img.png")):
        replies.append(client.chat.completions.create(model="tiny-omni", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}],
            **GREEDY).choices[0].message.content)
    assert replies[0] == replies[1]


def test_spoken_reply_is_a_playable_24khz_wav(server):
    client, *_ = server
    reply = client.chat.completions.create(
        model="tiny-omni", messages=[{"role": "user", "content": "Say it"}], modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"}, temperature=0, max_tokens=6, seed=1)
    audio = reply.choices[0].message.audio
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(audio.data)))
    assert rate == 24000 and samples.ndim == 1 and len(samples) > 0
    assert audio.transcript == reply.choices[0].message.content


def test_concurrent_requests_equal_sequential_ones(server):
    client, *_ = server
    prompts = [f"Question number {i}: " + "why? " * i for i in range(6)]
    sequential = [_ask(client, p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        concurrent = list(pool.map(lambda p: _ask(client, p).choices[0].message.content, prompts))
    assert concurrent == sequential


def test_bad_requests_get_400_naming_the_field_while_others_succeed(server):
    client, port, root, _ = server
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(_ask, client, "A fine question", max_tokens=40)
        cases = {
            "audio.voice": dict(modalities=["text", "audio"], audio={"voice": "Nobody", "format": "wav"}),
            "temperature": dict(temperature=-1),
            "messages": dict(messages=[{"role": "user", "content": "word " * 1100}]),
            "n": dict(n=2),
        }
        for param, kwargs in cases.items():
            body = dict(model="tiny-omni", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            body.update(kwargs)
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(**body)
            assert err.value.status_code == 400
            assert err.value.body["param"] == param, err.value.body
        with pytest.raises(openai.BadRequestError) as err:  # unreadable media
            client.chat.completions.create(model="tiny-omni", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(root / "missing.png")}}]}])
        assert "missing.png" in err.value.body["message"] and err.value.body["param"] == "messages"
        assert good.result().choices[0].finish_reason == "length"


def test_short_request_overtakes_a_long_one(server):
    client, *_ = server
    done = {}

    def long_request():
        _ask(client, "Tell a long story", max_tokens=900)
        done["long"] = time.perf_counter()

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)  # the long request is decoding
    _ask(client, "Short?", max_tokens=4)
    done["short"] = time.perf_counter()
    assert "long" not in done  # the short one finished while the long one was still generating
    thread.join()
    assert done["long"] > done["short"]


def test_disconnect_mid_stream_frees_the_slot(server):
    client, port, *_ = server
    body = {"model": "tiny-omni", "messages": [{"role": "user", "content": "Go on and on"}], "max_tokens": 900,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] == 1
    deadline = time.time() + 20
    while httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] == 0


def test_graceful_shutdown_finishes_requests_in_flight(server):
    client, port, root, proc = server
    result = {}

    def in_flight():
        result["reply"] = _ask(client, "One last thing", max_tokens=300)

    thread = threading.Thread(target=in_flight)
    thread.start()
    deadline = time.time() + 30
    while httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    thread.join(120)
    assert result["reply"].choices[0].finish_reason == "length"
    assert result["reply"].usage.completion_tokens == 300
    # uvicorn exits by re-raising the signal it handled, after the graceful shutdown
    assert proc.wait(60) in (0, -signal.SIGINT)
    log = (root / "server.log").read_text()
    assert "Waiting for application shutdown" in log and "Application shutdown complete" in log
