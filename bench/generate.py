"""Generation speed: omni_jax vs HF transformers on the same random thinker with Qwen2.5-0.5B dimensions.

Model: a Qwen2.5-Omni thinker whose language model has the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads,
2 KV heads, head_dim 64, ffn 4864, vocab 151936; untied lm_head as in the Omni thinker: 630 M params), tiny
audio/vision towers (unused by text prompts), random weights, saved once as an HF directory (safetensors,
float32) that both frameworks load. Each (framework, dtype) runs in its own fresh subprocess, one after the
other, so they never compete for the cores or memory.

Measured per (framework, dtype in float32/bfloat16):
  * prefill tokens/s: batch 1, a 512-token prompt, time to the first generated token;
  * decode tokens/s at batch 1 and batch 8: (tokens(N) - tokens(1)) / (t(N) - t(1)), i.e. the generate time
    beyond the prefill and first token, for N = --new-tokens tokens per row from a --decode-prompt-token prompt,
    with no end token so every row runs to N;
each the best of --repeats timed runs after one warm-up (compilation) run. With --rounds N the workers run N
times in turn (ours, HF, ours, HF, ...; the machine's memory bandwidth drifts over minutes, so alternating
gives both frameworks the same phases), and each framework's figure is its best over the rounds.
And the machine's memory-bandwidth bound for batch-1 decode: a decode step must read every weight it uses
(all layer matrices and the lm_head; one embedding row), so tokens/s <= read bandwidth / those bytes. The read
bandwidth is measured here: best of several jitted full reductions over a 1 GiB array (a pure streaming read), in
4 KiB pages and in huge pages (where the served weights lie), the faster of the two.

    python bench/generate.py [--workdir DIR] [--json out.json] [--new-tokens 64] [--repeats 2] [--rounds 1]
    python bench/generate.py --only jax --dtypes bfloat16        # a subset

Prints a table and, with --json, writes every figure. Needs ~4 GB disk and ~6 GB memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXT = dict(hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, ffn=4864, vocab=151936)
PREFILL_TOKENS = 512
# HF figures the issue measured on this machine (tokens/s), for reference in the report.
ISSUE_HF = {"float32": dict(prefill=171, decode_b1=8.4, decode_b8=37),
            "bfloat16": dict(prefill=587, decode_b1=20.3, decode_b8=111)}


# ------------------------------------------------------------------------------------------------ model
def write_model(path: str) -> None:
    """Random Qwen2.5-0.5B-shaped thinker saved as an HF directory (float32 safetensors)."""
    import torch
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=TEXT["vocab"], hidden_size=TEXT["hidden"], intermediate_size=TEXT["ffn"],
                         num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"],
                         num_key_value_heads=TEXT["kv_heads"], head_dim=TEXT["head_dim"], rms_norm_eps=1e-6,
                         max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64,
                          output_dim=TEXT["hidden"], num_mel_bins=128),
        vision_config=dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=64,
                           out_hidden_size=TEXT["hidden"], fullatt_block_indexes=[0]),
        vision_start_token_id=151652,  # HF get_rope_index reads it even for text prompts
    )
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    with torch.no_grad():  # O(1) logits so that greedy decoding does not collapse onto one token
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
    model.save_pretrained(path)


def prompts(batch: int, length: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 100000, (batch, length)).astype(np.int64)
    return ids, np.ones_like(ids)


# ------------------------------------------------------------------------------------------------ workers
def _best(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def worker_jax(model_dir: str, dtype: str, args) -> dict:
    import jax

    from omni_jax.api import OmniModel

    model = OmniModel.from_pretrained(model_dir, dtype=dtype)
    never = [-1]  # no end token: every row generates exactly N tokens

    def gen(batch, n):
        ids, mask = batch
        out = model.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=n, eos_token_id=never)
        return out.sequences

    return _measure(gen, args) | {"devices": str(jax.devices()[0]), "compiled_shapes": model.num_compiled_shapes}


def worker_hf(model_dir: str, dtype: str, args) -> dict:
    import torch
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).eval()

    def gen(batch, n):
        ids, mask = batch
        with torch.inference_mode():
            return model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    return _measure(gen, args) | {"torch_threads": torch.get_num_threads()}


def _measure(gen, args) -> dict:
    n = args.new_tokens
    out = {}
    long_prompt = prompts(1, PREFILL_TOKENS, 0)
    t = _best(lambda: gen(long_prompt, 1), args.repeats)
    out["prefill_tok_s"] = PREFILL_TOKENS / t
    out["prefill_s"] = t
    for b in (1, 8):
        batch = prompts(b, args.decode_prompt_tokens, b)
        t1 = _best(lambda: gen(batch, 1), args.repeats)
        tn = _best(lambda: gen(batch, n), args.repeats)
        out[f"decode_b{b}_tok_s"] = b * (n - 1) / (tn - t1)
        out[f"decode_b{b}_s"] = [t1, tn]
    return out


def worker_bandwidth(args) -> dict:
    """Read bandwidth (bytes/s): best jitted sum over a 1 GiB float32 array, in malloc's 4 KiB pages and in
    transparent huge pages (where a served model's decode weights lie, `omni_jax.kernels.huge_pages`), alternating;
    the bound uses the faster of the two."""
    import jax
    import jax.numpy as jnp

    from omni_jax.kernels import huge_pages

    plain = jnp.ones((256, 1024, 1024), jnp.float32)  # 1 GiB
    held = huge_pages.hold(jnp.ones((256, 1024, 1024), jnp.float32))
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    total(plain).block_until_ready()
    best = {"4k": float("inf"), "huge": float("inf")}
    for _ in range(8):
        for name, x in (("4k", plain), ("huge", held)):
            best[name] = min(best[name], _timed(lambda: total(x).block_until_ready()))
    rates = {name: plain.nbytes / seconds for name, seconds in best.items()}
    return {"read_bytes_per_s": max(rates.values()), "read_bytes_per_s_4k_pages": rates["4k"],
            "read_bytes_per_s_huge_pages": rates["huge"]}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_bytes_per_token(bytes_per_param: int) -> int:
    """Weight bytes one batch-1 decode step reads: every layer matrix/bias/norm and the lm_head (one embedding
    row is negligible). The KV cache (< 1% at these lengths) is ignored, which only raises the bound."""
    h, f, v, L = TEXT["hidden"], TEXT["ffn"], TEXT["vocab"], TEXT["layers"]
    q, kv = TEXT["heads"] * TEXT["head_dim"], TEXT["kv_heads"] * TEXT["head_dim"]
    per_layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * f + 2 * h
    return (L * per_layer + h + v * h) * bytes_per_param


# ------------------------------------------------------------------------------------------------ driver
def run_worker(kind: str, model_dir: str, dtype: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model-dir", model_dir, "--dtype", dtype,
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--decode-prompt-tokens", str(args.decode_prompt_tokens)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device, all cores
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {dtype} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    print(f"  {kind:9s} {dtype:8s} {json.dumps(result)}", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the model is written (default: a temp dir)")
    p.add_argument("--json", default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="alternate the workers this many times; best per metric")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--only", default="jax,hf", help="frameworks to run: jax,hf")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        if args.worker == "bandwidth":
            result = worker_bandwidth(args)
        else:
            result = {"jax": worker_jax, "hf": worker_hf}[args.worker](args.model_dir, args.dtype, args)
        print(json.dumps(result))
        return 0

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_generate_")
    model_dir = os.path.join(workdir, "thinker_0.5b")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"writing the random model to {model_dir}", flush=True)
        write_model(model_dir)
    results = {"config": TEXT, "prefill_tokens": PREFILL_TOKENS, "new_tokens": args.new_tokens,
               "decode_prompt_tokens": args.decode_prompt_tokens, "repeats": args.repeats, "cpus": os.cpu_count(),
               "runs": {}}
    probes = [run_worker("bandwidth", model_dir, "float32", args)]
    rounds = {}
    for round_index in range(args.rounds):
        for dtype in args.dtypes.split(","):
            for kind in args.only.split(","):
                rounds.setdefault(f"{kind}_{dtype}", []).append(run_worker(kind, model_dir, dtype, args))
        if round_index + 1 < args.rounds:
            probes.append(run_worker("bandwidth", model_dir, "float32", args))
    # The bound uses the best probe, as the rates are each framework's best over the rounds.
    results["bandwidth"] = max(probes, key=lambda probe: probe["read_bytes_per_s"])
    if len(probes) > 1:
        results["bandwidth_probes"] = probes
    for key, runs in rounds.items():
        best = dict(runs[0])
        for metric in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"):
            best[metric] = max(run[metric] for run in runs)
        results["runs"][key] = best | ({"rounds": runs} if len(runs) > 1 else {})

    bw = results["bandwidth"]["read_bytes_per_s"]
    rounds_note = f" (best of {args.rounds} alternating rounds)" if args.rounds > 1 else ""
    pages = results["bandwidth"]
    pages_note = (f" (4 KiB pages {pages['read_bytes_per_s_4k_pages'] / 1e9:.1f}, "
                  f"huge pages {pages['read_bytes_per_s_huge_pages'] / 1e9:.1f})")
    print(f"\nread bandwidth {bw / 1e9:.1f} GB/s{pages_note}{rounds_note}; prefill {PREFILL_TOKENS} tokens; "
          f"decode {args.new_tokens} new tokens "
          f"after a {args.decode_prompt_tokens}-token prompt")
    header = f"{'dtype':9s}{'metric':12s}{'omni_jax':>10s}{'HF':>10s}{'ratio':>8s}{'bound':>8s}{'% bound':>9s}"
    print(header)
    for dtype in args.dtypes.split(","):
        bound = bw / decode_bytes_per_token(2 if dtype == "bfloat16" else 4)
        results[f"decode_b1_bound_{dtype}"] = bound
        for metric in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"):
            ours = results["runs"].get(f"jax_{dtype}", {}).get(metric)
            ref = results["runs"].get(f"hf_{dtype}", {}).get(metric)
            ratio = f"{ours / ref:8.2f}" if ours and ref else f"{'-':>8s}"
            b = f"{bound:8.1f}{100 * ours / bound:8.0f}%" if metric == "decode_b1_tok_s" and ours else ""
            print(f"{dtype:9s}{metric:12s}{ours or 0:10.1f}{ref or 0:10.1f}{ratio}{b}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
