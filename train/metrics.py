"""Run metrics: WORKDIR/metrics.jsonl (one JSON object per line), TensorBoard, the loss-curve PNG, MFU.

metrics.jsonl lines: train steps {"step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s",
"mfu", ...} (+ "thinker_loss", "talker_loss" with the talker loss; "loss" is then their weighted sum); evals
{"step", "eval_loss", "eval_talker_loss", "eval_accuracy", ...}. On resume the file is truncated to the steps
up to the restored checkpoint, so the file of a resumed run equals that of an uninterrupted one (timings
aside). Only process 0 writes.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional

import jax


def train_flops_per_token(text_config, seq_len: int, include_head: bool = True) -> float:
    """Forward + backward FLOPs per token of the thinker LM (6 * matmul params + attention), PaLM-style.

    Embedding lookups are not matmuls and are excluded; the lm_head (6 * hidden * vocab) is included unless
    include_head=False (when it runs only at the loss positions, count it per loss token instead). Attention:
    12 * layers * heads * head_dim * seq_len (scores and weighted sum, forward and backward, full count).
    """
    c = text_config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    matmul_params = c.num_hidden_layers * per_layer + (d * v if include_head else 0)
    return 6.0 * matmul_params + 12.0 * c.num_hidden_layers * q * seq_len


def measure_matmul_peak(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one device on a square matmul (the best of `repeats` timed runs, after a warm-up).

    Low-precision dtypes take the faster of a plain product and one accumulating in float32 (what the model's
    projections do; on CPU the f32-accumulating bf16 product is ~2x faster than the plain one)."""
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    variants = [jax.jit(lambda x: x @ x)]
    if jnp.dtype(dtype) != jnp.float32:
        variants.append(jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32)))
    best = float("inf")
    for f in variants:
        f(a).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t)
    return 2.0 * size ** 3 / best


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate(resume_step or 0)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step)
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self._tb = None

    def _truncate(self, step: int) -> None:
        """Drop lines after `step` (left by a run killed after its last checkpoint)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v)
                  for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(("eval/" if key.startswith("eval_") else "train/") + key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(workdir: str, out: Optional[str] = None) -> Optional[str]:
    """WORKDIR/loss_curve.png: train loss per step and eval loss (and accuracy on a second axis); with the
    talker loss also the thinker and talker parts of the train loss and the eval talker loss."""
    if jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"], r.get("eval_accuracy")) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    for key in ("thinker_loss", "talker_loss"):
        part = [(r["step"], r[key]) for r in records if key in r]
        if part:
            ax.plot(*zip(*part), label=f"train {key.replace('_', ' ')}", lw=0.8, alpha=0.7)
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="eval loss")
    talker_evals = [(r["step"], r["eval_talker_loss"]) for r in records if "eval_talker_loss" in r]
    if talker_evals:
        ax.plot(*zip(*talker_evals), "^-", label="eval talker loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    accs = [(e[0], e[2]) for e in evals if e[2] is not None]
    if accs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*accs), "s--", color="tab:green", label="eval accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    out = out or os.path.join(workdir, "loss_curve.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
