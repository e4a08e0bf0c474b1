"""Train-step throughput at Qwen2.5-0.5B thinker dimensions: omni_jax vs HF transformers (PyTorch), and MFU.

    python bench/train.py                         # float32 and bfloat16, ours and HF, batch 1 x 512
    python bench/train.py --dtypes bfloat16 --steps 5 --json out.json

Ours: train.step.Trainer (the loop's jitted step: forward, f32 cross-entropy on every position, backward,
global-norm clipping, AdamW) on one device, f32 master weights, `--dtypes` the compute dtype. The thinker's
audio and vision towers keep the tiny preset's size (they get no gradient from text but are in the AdamW
update, ~0.1 M params). HF: Qwen2ForCausalLM with the same text config in a separate process (same run),
loss from `labels`, backward, clip_grad_norm_, torch.optim.AdamW; bfloat16 = torch.autocast over f32 master
weights (the same mixed precision as ours). Tokens/s counts batch x seq_len per step (median of the timed
steps, after warm-up steps that include compilation). MFU = model FLOPs (train.metrics.train_flops_per_token:
6 x matmul params + attention) / step time / the measured matmul peak of the same dtype on the same device.
Defaults: ours with remat "full" (the layer is recomputed in the backward pass; its FLOPs are not counted in
MFU, as MaxText does); both workers with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (`--no-malloc-hugepages` off).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _REPO  # `python bench/train.py`: `train` must be the package, not this file

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, head_dim=64, rope_theta=1000000.0,
                  rms_norm_eps=1e-6)
MROPE_SECTION = [8, 12, 12]  # head_dim 64 -> 32 rotary pairs, the release's 16/24/24 split scaled by 1/2


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def text_dims(layers: int | None) -> dict:
    dims = dict(QWEN25_05B)
    if layers:
        dims["num_hidden_layers"] = layers
    return dims


# ================================================================================================ ours
def bench_ours(dtype: str, batch: int, seq: int, steps: int, warmup: int, layers: int | None, remat: str,
               attention: str, loss_chunk: int = 0) -> dict:
    import jax
    import numpy as np
    import flax.linen as nn

    from omni_jax.config import OmniConfig, RuntimeOptions, apply_overrides
    from omni_jax.models.thinker import Thinker, init_thinker
    from omni_jax.sharding import make_mesh
    from train.config import OptimSection
    from train.metrics import measure_matmul_peak, train_flops_per_token
    from train.step import Trainer, make_optimizer, module_labels

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dims = text_dims(layers)
    hidden = dims["hidden_size"]
    overrides = [f"thinker.text.{k}={v}" for k, v in dims.items()] + [
        f"thinker.text.mrope_section={MROPE_SECTION}", f"thinker.audio.output_dim={hidden}",
        f"thinker.vision.out_hidden_size={hidden}", f"talker.embedding_size={hidden}", "enable_audio_output=false"]
    config = apply_overrides(OmniConfig.from_yaml(os.path.join(repo, "configs/models/tiny.yaml")), overrides)
    options = RuntimeOptions(dtype=dtype, param_dtype="float32", remat_policy=remat, attention_backend=attention)
    thinker = Thinker(config.thinker, options)
    device = jax.devices()[0]
    mesh = make_mesh({"fsdp": 1}, devices=[device])
    params = {"thinker": nn.meta.unbox(jax.jit(lambda r: init_thinker(thinker, r))(jax.random.key(0)))["params"]}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    optimizer = make_optimizer(OptimSection(learning_rate=1e-5, warmup_steps=0), 1000, module_labels(params, ()))
    trainer = Trainer(thinker, optimizer, mesh, loss_chunk=loss_chunk)
    state = trainer.init_state(params)
    del params
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, size=(1, batch, seq + 1)).astype(np.int32)
    host = {"input_ids": ids[..., :-1], "targets": ids[..., 1:], "loss_mask": np.ones((1, batch, seq), np.float32),
            "segment_ids": np.ones((1, batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, 3, batch, seq)).copy(),
            "audio": None, "image": None, "video": None}
    from train.batches import to_global

    batch_arrays = to_global(host, mesh)
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = trainer.step(state, batch_arrays)
        loss = float(metrics["loss"])  # waits for the step
        dt = time.perf_counter() - t
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
    step_s = _median(times)
    peak = measure_matmul_peak(dtype, size=8192 if device.platform == "gpu" else 2048)
    flops = train_flops_per_token(config.thinker.text, seq) * batch * seq
    return {"impl": "omni_jax", "dtype": dtype, "device": str(device.device_kind), "params": int(n_params),
            "step_s": step_s, "step_times_s": times, "tokens_per_s": batch * seq / step_s,
            "model_tflops_per_step": flops / 1e12, "matmul_peak_tflops": peak / 1e12,
            "mfu": flops / step_s / peak, "losses": losses, "remat": remat,
            "loss_chunk": loss_chunk}


# ================================================================================================ HF
def bench_hf(dtype: str, batch: int, seq: int, steps: int, warmup: int, layers: int | None) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = text_dims(layers)
    cfg = Qwen2Config(**{k: v for k, v in dims.items()}, tie_word_embeddings=False, max_position_embeddings=32768,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    ids = torch.randint(0, 150000, (batch, seq), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        sync()
        dt = time.perf_counter() - t
        if i >= warmup:
            times.append(dt)
    step_s = _median(times)
    return {"impl": "hf_transformers", "dtype": dtype, "device": device, "params": int(n_params),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "step_s": step_s,
            "step_times_s": times, "tokens_per_s": batch * seq / step_s, "losses": losses}


# ================================================================================================ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--layers", type=int, default=None, help="override 24 layers (quick checks)")
    p.add_argument("--remat", default="full", help="ours: remat policy (full: fastest here in bf16, see "
                   "docs/performance.md; none keeps every activation)")
    p.add_argument("--malloc-hugepages", action=argparse.BooleanOptionalAction, default=True,
                   help="run both workers with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (large buffers on transparent "
                   "huge pages: fewer page faults on the step's fresh temporaries)")
    p.add_argument("--loss-chunk", type=int, default=0, help="ours: fused chunked lm_head + cross-entropy (tokens)")
    p.add_argument("--attention", default="xla")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)
    common = dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup, layers=args.layers)

    if args.worker:  # one measurement in this process, JSON on the last stdout line
        dtype = args.dtypes
        if args.worker == "ours":
            out = bench_ours(dtype, remat=args.remat, attention=args.attention, loss_chunk=args.loss_chunk, **common)
        else:
            out = bench_hf(dtype, **common)
        print(json.dumps(out))
        return 0

    results = []
    for dtype in args.dtypes.split(","):
        for worker in (["ours"] if args.no_hf else ["ours", "hf"]):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--dtypes", dtype,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--remat", args.remat, "--attention", args.attention,
                   "--loss-chunk", str(args.loss_chunk)]
            if args.layers:
                cmd += ["--layers", str(args.layers)]
            env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if args.malloc_hugepages:
                env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                results.append({"impl": worker, "dtype": dtype, "error": proc.stderr[-500:]})
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["glibc_tunables"] = env.get("GLIBC_TUNABLES", "")
            results.append(r)
            print(f"{r['impl']:16s} {dtype:9s} step {r['step_s']:.3f} s  {r['tokens_per_s']:.1f} tok/s"
                  + (f"  MFU {r['mfu']:.1%} of {r['matmul_peak_tflops']:.3f} TFLOP/s" if "mfu" in r else ""),
                  flush=True)
    for dtype in args.dtypes.split(","):
        ours = [r for r in results if r.get("impl") == "omni_jax" and r["dtype"] == dtype and "step_s" in r]
        hf = [r for r in results if r.get("impl") == "hf_transformers" and r["dtype"] == dtype and "step_s" in r]
        if ours and hf:
            print(f"{dtype}: omni_jax / HF tokens/s = {ours[0]['tokens_per_s'] / hf[0]['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
