"""Batch evaluation: `omni-jax eval --model DIR --requests in.jsonl --out out.jsonl [--audio-dir D]`.

Reads requests (one JSON object per line, the format of `serve.requests`; docs/eval.md), serves them with the
continuous-batching engine and appends one result record per request to the output JSONL, in completion order:

    {"id": "q1", "text": "...", "token_ids": [...], "finish_reason": "stop", "audio": "D/q1.wav" | null,
     "timings": {"queue": s, "preprocess": s, "prefill": s, "decode": s, "speech": s, "total": s,
                 "new_tokens": n, "tokens_per_s": x, "batch_size": n, ...}, "error": null}

A request that cannot be served (malformed line, unknown field, missing media file, unknown speaker, prompt
longer than the context, ...) gets a record with `"error": "<what is wrong>"` (and `"line"`: its line in the
requests file) and null results; the others complete. The requests are served by the continuous-batching engine
(`serve.continuous`): `--max-batch` decode slots, a request's reply the same whatever else runs beside it.

Crash safety and resuming: every record is written whole (one `write` of one line), flushed and fsynced before
the next, and a wav file is written (to a temp name, then renamed) before the record that names it. Re-running
with the same --out skips every request whose id (or, for a line without a usable id, whose line number)
already has a record, so a killed run resumes without redoing or losing records. A partial last line left by
a crash is cut off before appending (it is not a record).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, Optional

from serve.requests import Request, RequestError, read_requests

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ output file
def read_done(out_path: str) -> tuple[set[str], set[int]]:
    """Ids (and id-less error records' line numbers) already in `out_path`; cuts off a partial last line."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not os.path.exists(out_path):
        return ids, lines
    with open(out_path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # bytes after the last newline are a record cut short by a crash
        if end < len(data):
            log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", out_path,
                        len(data) - end)
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    for number, raw in enumerate(data[:end].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("%s line %d is not a JSON record; ignored", out_path, number)
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            ids.add(record["id"])
        elif isinstance(record, dict) and isinstance(record.get("line"), int):
            lines.add(record["line"])
    return ids, lines


class RecordWriter:
    """Appends one JSON record per line, each flushed and fsynced before `write` returns (path None: discards
    the records; the other processes of a multi-host run)."""

    def __init__(self, path: Optional[str]):
        self._f = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "ab")

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def audio_file_name(request_id: str) -> str:
    """A safe, unique wav name for an id: its safe characters plus a short hash of the whole id."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", request_id)[:80].strip(".") or "request"
    return f"{stem}-{hashlib.sha1(request_id.encode()).hexdigest()[:8]}.wav"


def write_wav(path: str, audio, rate: int) -> None:
    import soundfile

    tmp = path + ".tmp"
    soundfile.write(tmp, audio, rate, subtype="FLOAT", format="WAV")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def error_record(request_id: Optional[str], error: str, line: Optional[int]) -> dict:
    return {"id": request_id, "line": line, "text": None, "token_ids": None, "finish_reason": None, "audio": None,
            "timings": None, "error": error}


def _done_on_process0(out: str) -> tuple[set, set]:
    """`read_done(out)` as process 0 sees it, on every process of a multi-host run: only process 0 reads (and
    repairs) the output file, and every process must skip the same requests to run the same batches."""
    import jax

    if jax.process_count() == 1:
        return read_done(out)
    done = read_done(out) if jax.process_index() == 0 else (set(), set())
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps([sorted(done[0]), sorted(done[1])]).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buf = np.zeros(size, np.uint8)
    buf[: min(size, data.size)] = data[:size]  # process 0's own bytes; the others' are ignored
    ids, lines = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())
    return set(ids), set(lines)


# ------------------------------------------------------------------------------------------------ the run
def run_eval(model: str, requests: str, out: str, audio_dir: Optional[str] = None, max_batch: int = 8,
             dtype: str = "float32", mesh_shape: Optional[dict] = None, progress: bool = True) -> dict[str, Any]:
    """Serve every request of `requests` not yet in `out`; returns a summary (counts, seconds, tokens/s)."""
    start = time.perf_counter()
    if not os.path.isfile(requests):
        raise FileNotFoundError(f"requests file not found: {requests}")
    done_ids, done_lines = _done_on_process0(out)
    audio_dir = audio_dir or os.path.splitext(os.path.abspath(out))[0] + "_audio"

    from omni_jax.api import OmniModel
    from omni_jax.processing.processor import Processor
    from serve.continuous import ContinuousEngine
    from serve.events import SAMPLE_RATE, Failed, Finished

    omni = OmniModel.from_pretrained(model, dtype=dtype, mesh_shape=mesh_shape)
    if omni.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files (tokenizer.json or vocab.json)")
    processor = Processor.from_pretrained(model)
    engine = ContinuousEngine(omni, processor, max_slots=max_batch)
    import jax

    # Multi-host (jax.distributed): every process runs the same batches (each feeding its devices' slice of
    # them, see OmniModel._shard_batch); process 0 writes the records and the wavs.
    is_writer = jax.process_index() == 0
    writer = RecordWriter(out if is_writer else None)
    summary = {"answered": 0, "errors": 0, "skipped": 0, "new_tokens": 0}

    def emit(record: dict) -> None:
        writer.write(record)
        summary["errors" if record["error"] else "answered"] += 1

    try:
        todo: list[Request] = []
        for item in read_requests(requests, speakers=engine.speakers, has_speech=engine.has_speech):
            if isinstance(item, RequestError):
                key_done = item.request_id in done_ids if item.request_id else item.line in done_lines
                if key_done:
                    summary["skipped"] += 1
                else:
                    emit(error_record(item.request_id, str(item), item.line))
            elif item.id in done_ids:
                summary["skipped"] += 1
            else:
                todo.append(item)
        for request in todo:
            engine.submit(request)
        bar = _progress(len(todo), progress)
        decode_start = time.perf_counter()
        for event in engine.run():
            if isinstance(event, Finished):
                audio_path = None
                if event.audio is not None:
                    audio_path = os.path.join(audio_dir, audio_file_name(event.id))
                    if is_writer:
                        os.makedirs(audio_dir, exist_ok=True)
                        write_wav(audio_path, event.audio, SAMPLE_RATE)
                emit({"id": event.id, "line": event.request.line, "text": event.text, "token_ids": event.token_ids,
                      "finish_reason": event.finish_reason, "audio": audio_path,
                      "timings": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in event.timings.items()},
                      "error": None})
                summary["new_tokens"] += len(event.token_ids)
            elif isinstance(event, Failed):
                emit(error_record(event.id, event.error, event.request.line))
            else:
                continue
            if bar is not None:
                elapsed = time.perf_counter() - decode_start
                bar.set_postfix(tok_s=f"{summary['new_tokens'] / max(elapsed, 1e-9):.1f}", errors=summary["errors"])
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        writer.close()
    summary["seconds"] = time.perf_counter() - start
    summary["tokens_per_s"] = summary["new_tokens"] / max(summary["seconds"], 1e-9)
    summary["compiled_shapes"] = len(engine.prefill_shapes) + len(engine.decode_shapes) + len(engine.embed_shapes)
    return summary


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)


def parse_mesh(text: Optional[str]) -> Optional[dict]:
    """"data=2,tensor=4" -> {"data": 2, "tensor": 4}."""
    if not text:
        return None
    mesh = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size.isdigit():
            raise ValueError(f"--mesh: expected axis=size pairs like data=2,tensor=4, got {part!r}")
        mesh[name.strip()] = int(size)
    return mesh


def main(args) -> int:
    """The `omni-jax eval` command (args from omni_jax.cli)."""
    if args.distributed:
        import jax

        from omni_jax.sharding import maybe_initialize_distributed

        maybe_initialize_distributed()  # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, if set
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()  # cluster auto-detection (Cloud TPU, SLURM, ...)
    summary = run_eval(args.model, args.requests, args.out, audio_dir=args.audio_dir, max_batch=args.max_batch,
                       dtype=args.dtype, mesh_shape=parse_mesh(args.mesh), progress=not args.no_progress)
    print(f"eval: {summary['answered']} answered, {summary['errors']} errors, {summary['skipped']} already done; "
          f"{summary['new_tokens']} tokens in {summary['seconds']:.1f} s ({summary['tokens_per_s']:.1f} tokens/s), "
          f"{summary['compiled_shapes']} compiled prefill / decode / embed shapes -> {args.out}", file=sys.stderr)
    return 0
