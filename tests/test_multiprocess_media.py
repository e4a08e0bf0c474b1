"""Media in a multi-process run: two processes (jax.distributed, gloo), each with its own rows and media (one
has an image and a clip, the other a video with its audio track and a text-only row), build the same global
step batch that one process builds from all four rows: the token arrays sharded by process, the encoder inputs
gathered and replicated (train/process_gather.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.processing.processor import Processor
from omni_jax.processing.tokenizer import write_qwen_tokenizer
from train.batches import stack_microbatches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multiprocess_media_worker as worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_with_media_build_the_single_process_batch(tmp_path):
    tokenizer = write_qwen_tokenizer(str(tmp_path / "tok"))
    out = tmp_path / "global.npz"
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   PYTHONPATH=REPO, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "tests/multiprocess_media_worker.py"),
                                       tokenizer, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    # one process, all four rows in process order
    processor = Processor.from_pretrained(tokenizer)
    config = OmniConfig.from_yaml(os.path.join(REPO, "configs/models/tiny.yaml"))
    whole = worker.pipeline_batch(processor, worker.ROWS[0] + worker.ROWS[1])
    assert all(whole.get(k) is not None for k in ("input_features", "pixel_values", "pixel_values_videos"))
    expected = worker.flat(stack_microbatches([whole], config.thinker, worker.BUCKETS))
    got = dict(np.load(out))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        # the same numbers moved between processes: exact
        np.testing.assert_array_equal(got[key], np.asarray(value), err_msg=key)
    assert jax.process_count() == 1
