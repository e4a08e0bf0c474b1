"""Serving throughput: the continuous-batching engine (serve/continuous.py) against static batching (the
engine it replaced: batches of requests through `OmniModel.generate`, each batch run until all its rows end) on
the same requests, in one process and one run.

Model: the random Qwen2.5-0.5B-shaped thinker of bench/generate.py (630 M params), served in bfloat16.
Requests: 96 text prompts of 33-64 tokens (one prompt bucket for the static engine), max_new_tokens 256. Replies
must end at lengths the engines cannot know in advance, as end tokens do on a real model; a random model has no
such ends, so a first greedy pass (which also compiles the continuous engine's programs) records each reply, and
each request then gets a stop token id (vLLM's `stop_token_ids`): the token at a position drawn from 8-256 of its
own reply that it has not produced before (the first such token at or after the drawn position). The reply
ends there.

  * continuous: `ContinuousEngine(max_slots=S)` serves the requests with their stop ids;
  * static: the same requests in batches of S in submission order, each batch one `OmniModel.generate` call
    (left-padded, one prompt bucket, one compiled shape, compiled beforehand). A batch ends when all its rows have
    ended; with per-request stop ids it cannot stop early for one row, so each reply is cut at its stop id
    afterwards and the batch runs until its longest reply ends (at most 256 steps), as the old engine did with
    end tokens.
Output tokens/s = the tokens the clients keep / wall time from submitting all requests to the last reply. Also:
time to first token (p50 / p99, from submission), the KV pages in use against the tokens held (continuous), and
the compiled shapes.

    python bench/serve.py [--workdir DIR] [--slots 16] [--requests 96] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This file is bench/serve.py: its folder must not shadow the `serve` package.
sys.path = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(ROOT, "bench")]

NO_EOS = 151936 + 1  # an id no row can produce: static rows run to their batch's step count
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near old "
         "stone bridges and rivers under bright winter skies").split()


def make_requests(processor, count: int, max_new_tokens: int, seed: int = 0) -> list[dict]:
    """`count` chat requests whose prompts are 33-64 tokens long (one static prompt bucket)."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 40))]
        messages = [{"role": "user", "content": [{"type": "text", "text": " ".join(words)}]}]
        length = processor([messages])["input_ids"].shape[1]
        if 33 <= length <= 64:
            out.append({"id": f"q{len(out)}", "messages": messages, "max_new_tokens": max_new_tokens})
    return out


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, float), q))


def serve_all(engine, requests) -> tuple[float, dict]:
    from serve.events import Failed, Finished

    start = time.perf_counter()
    finished = {}
    for event in engine.serve(requests):
        if isinstance(event, Finished):
            finished[event.id] = event
        elif isinstance(event, Failed):
            raise RuntimeError(f"{event.id}: {event.error}")
    return time.perf_counter() - start, finished


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the model is written (default: a temp dir)")
    p.add_argument("--slots", type=int, default=16, help="continuous decode slots = static max_batch")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(ROOT, "bench", "generate.py"))
    bench_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_generate)
    write_model = bench_generate.write_model  # the 0.5B-shaped thinker of bench/generate.py

    from omni_jax.api import OmniModel
    from omni_jax.processing.processor import Processor
    from omni_jax.processing.tokenizer import write_qwen_tokenizer
    from serve.continuous import ContinuousEngine

    workdir = args.workdir or tempfile.mkdtemp(prefix="omni_jax_serve_bench_")
    model_dir = os.path.join(workdir, "thinker_0.5b")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        os.makedirs(model_dir, exist_ok=True)
        write_model(model_dir)
        write_qwen_tokenizer(model_dir)
    model = OmniModel.from_pretrained(model_dir, dtype="bfloat16")
    processor = Processor.from_pretrained(model_dir)
    requests = make_requests(processor, args.requests, args.max_new_tokens)
    max_len = 64 + args.max_new_tokens

    def continuous_engine():
        return ContinuousEngine(model, processor, max_slots=args.slots, page_size=args.page_size,
                                max_model_len=max_len, chunk_size=64)

    # 1. greedy pass without stops: the replies (to pick stop ids from) and the continuous engine's compiles
    t = time.perf_counter()
    _, full = serve_all(continuous_engine(), requests)
    first_pass_s = time.perf_counter() - t
    rng = random.Random(1)
    stopped, kept = [], {}
    for r in requests:
        tokens = full[r["id"]].token_ids
        # the first token at or after the drawn position that the reply has not produced before, so that the
        # reply ends there (a random model repeats tokens; an earlier occurrence would end it sooner)
        drawn = rng.randint(8, args.max_new_tokens)
        fresh = [i for i in range(drawn - 1, len(tokens)) if tokens.index(tokens[i]) == i]
        stop_id = tokens[fresh[0] if fresh else drawn - 1]
        end = tokens.index(stop_id) + 1
        kept[r["id"]] = end
        stopped.append(dict(r, stop_token_ids=[stop_id]))
    mean_reply = sum(kept.values()) / len(kept)

    # 2. continuous, with the stop ids
    engine = continuous_engine()
    cont_s, cont = serve_all(engine, stopped)
    for r in stopped:
        assert len(cont[r["id"]].token_ids) == kept[r["id"]], r["id"]
        assert cont[r["id"]].token_ids == full[r["id"]].token_ids[: kept[r["id"]]], r["id"]
    ratios = [pages * engine.page_size / held for pages, held in engine.page_samples if held]
    pages_total = sum(pages for pages, _ in engine.page_samples) * engine.page_size
    held_total = sum(held for _, held in engine.page_samples)

    # 3. static: batches of S through generate(), stopping when the batch's longest reply has ended
    class BatchDone(Exception):
        pass

    def run_static(batch_requests, t0, first_token_at, done):
        """One generate() call of max_new_tokens (one compiled shape) that ends once every row has reached its
        stop (checked every 8 steps on the host, as the old engine's streaming did)."""
        batch = processor([r["messages"] for r in batch_requests])
        want = [kept.get(r["id"], args.max_new_tokens) for r in batch_requests]
        seen = {}

        def on_tokens(step, tokens):
            if "first" not in seen:
                seen["first"] = time.perf_counter()
            seen["tokens"] = tokens
            if all(tokens.shape[1] >= w for w in want):
                raise BatchDone

        try:
            model.generate(batch, max_new_tokens=args.max_new_tokens, eos_token_id=[NO_EOS], chunk_steps=8,
                           on_tokens=on_tokens)
        except BatchDone:
            pass
        for row, r in enumerate(batch_requests):
            first_token_at[r["id"]] = seen["first"] - t0
            done[r["id"]] = seen["tokens"][row, : want[row]].tolist()

    t = time.perf_counter()
    run_static(requests[: args.slots], t, {}, {})  # compiles the one shape (a full-length batch)
    static_warm_s = time.perf_counter() - t
    t0 = time.perf_counter()
    static_first, static_tokens = {}, {}
    for i in range(0, len(requests), args.slots):
        run_static(requests[i: i + args.slots], t0, static_first, static_tokens)
    static_s = time.perf_counter() - t0
    # In bfloat16 the two engines' greedy tokens may part where two logits are within rounding of each other (their
    # attention sums in another order); the counts kept are the same either way. Reported, not asserted (float32
    # equality is tested in tests/test_continuous.py).
    same_replies = sum(static_tokens[r["id"]] == full[r["id"]].token_ids[: kept[r["id"]]] for r in requests)

    tokens = sum(kept.values())
    ttft_cont = [f.timings["ttft"] for f in cont.values()]
    ttft_static = list(static_first.values())
    result = {
        "model": "random Qwen2.5-0.5B-shaped thinker, bfloat16", "requests": len(requests), "slots": args.slots,
        "max_new_tokens": args.max_new_tokens, "mean_reply_tokens": mean_reply, "output_tokens": tokens,
        "static_replies_equal_to_continuous": same_replies,
        "continuous": {"seconds": cont_s, "tokens_per_s": tokens / cont_s,
                       "ttft_p50_s": percentile(ttft_cont, 50), "ttft_p99_s": percentile(ttft_cont, 99),
                       "decode_steps": engine.stats["decode_steps"],
                       "mean_rows_per_step": engine.stats["decode_rows"] / max(engine.stats["decode_steps"], 1),
                       "pages_over_tokens_mean": pages_total / max(held_total, 1),
                       "pages_over_tokens_max": max(ratios), "peak_pages": engine.peak_pages,
                       "page_size": engine.page_size, "preemptions": engine.stats["preemptions"],
                       "compiled": {"prefill": sorted(engine.prefill_shapes), "decode": sorted(engine.decode_shapes),
                                    "embed": len(engine.embed_shapes)},
                       "first_pass_with_compiles_s": first_pass_s},
        "static": {"seconds": static_s, "tokens_per_s": tokens / static_s,
                   "ttft_p50_s": percentile(ttft_static, 50), "ttft_p99_s": percentile(ttft_static, 99),
                   "compiled_shapes": model.num_compiled_shapes, "warmup_s": static_warm_s,
                   "steps_per_batch": "until the batch's longest reply ends"},
    }
    result["speedup"] = result["continuous"]["tokens_per_s"] / result["static"]["tokens_per_s"]
    print(f"{len(requests)} requests, {args.slots} slots, replies {mean_reply:.1f} tokens on average "
          f"(max_new_tokens {args.max_new_tokens}), {tokens} output tokens")
    for name in ("continuous", "static"):
        r = result[name]
        print(f"  {name:10s} {r['seconds']:7.1f} s  {r['tokens_per_s']:7.1f} output tokens/s  TTFT p50 "
              f"{r['ttft_p50_s']:.2f} s  p99 {r['ttft_p99_s']:.2f} s")
    c = result["continuous"]
    print(f"  speedup {result['speedup']:.2f}x; KV pages x page size / tokens held: mean "
          f"{c['pages_over_tokens_mean']:.3f}, max {c['pages_over_tokens_max']:.3f}; "
          f"{c['mean_rows_per_step']:.1f} rows per decode step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
