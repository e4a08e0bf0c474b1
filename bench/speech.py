"""Speech-output speed, omni_jax vs HF transformers (PyTorch CPU), at the released Talker / Token2Wav dims.

Every measurement runs in its own subprocess, one after the other (JAX and PyTorch would fight over the cores):

    peak      this machine's matmul peak: jitted [N, N] @ [N, N] in float32, and bfloat16 inputs with
              preferred_element_type=float32 (N = 2048, plus the DiT's own [1000, 1024] @ [1024, 2048])
    dit       flow-matching mel for `--codes` codec tokens (250 = 5 s of speech = 500 mel frames): `--steps` time
              points (9 RK4 intervals x 4 evaluations x CFG batch 2), released DiT dims, random weights
    bigvgan   the vocoder on the resulting [1, 80, 500] mel -> 120000 samples (5 s at 24 kHz)
    talker    talker decode tokens/s at batch 1 and 8 (`--talker-batches`) after a `--talker-prompt`-long prefill:
              ours = one jitted on-device decode loop of `--talker-steps` steps; HF = `talker.generate` with the
              release's sampling, per-step time from a logits processor's timestamps (the first step, which
              includes the prefill, is excluded)

Token2Wav real-time factor = (DiT + BigVGAN seconds) / 5 s of audio. Medians of `--repeats` runs; compile time
(ours: `jit(...).lower().compile()`) is reported separately and excluded. Both sides get the same random
inputs; weights are random (speed does not depend on their values), float32 or bfloat16 (`--dtypes`).

DiT FLOPs (counted analytically, multiply-add = 2 FLOPs; B = CFG batch 2, T frames, D hidden, L layers, F = 2D,
E codec emb, W = the keys a query may see):
    per evaluation = 2·B·T·[ L·(4·D·D + 2·D·F + 2·W·D) + (M + enc_dim + E + enc_emb_dim)·D + D·M ]
    per sample     = (steps - 1) · 4 · per evaluation
We count *useful* attention FLOPs: W = the allowed keys of the block mask (24 in the own block, +24 per look-ahead /
look-back block: 19 layers see 24, 3 see 48), not the dense T keys the reference multiplies and then masks. The
ECAPA speaker encoder (~1 GFLOP per row and evaluation at T_ref = 300) and the time/AdaLN MLPs (per row, not per
frame) are left out: < 1% of the total. Achieved FLOP/s = that count / DiT seconds.

    python bench/speech.py                                    # everything (long: HF's f32 DiT ~2 min a sample)
    python bench/speech.py --parts dit,bigvgan --dtypes float32 --impls ours --repeats 2
    python bench/speech.py --table-only                        # re-print the table from the JSON
    python bench/speech.py --parts talker --rounds 3           # talker workers alternate 3 times, best of each

Results are merged into `--json` (default bench/results/speech.json: each (impl, part, dtype) entry is replaced
when re-measured) and the markdown table is written to `--markdown` (default: the JSON's path with .md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRESET = os.path.join(ROOT, "configs/models/qwen2_5_omni_7b.yaml")
T_REF = 300  # reference-mel frames of the voice prompt fed to ECAPA
AUDIO_SECONDS_PER_CODE = 0.02  # 2 mel frames of 240 samples at 24 kHz
HF_TALKER_SAMPLING = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05)


# ============================================================================================ helpers


def _configs():
    from omni_jax.config import OmniConfig

    cfg = OmniConfig.from_yaml(os.environ.get("SPEECH_BENCH_PRESET", PRESET))
    return cfg.talker, cfg.token2wav.dit, cfg.token2wav.bigvgan


def dit_flops(cfg, frames: int, steps: int, cfg_batch: int = 2) -> float:
    """Useful matmul FLOPs of one flow-matching sample (see the module docstring)."""
    D, F, bs = cfg.hidden_size, cfg.ff_mult * cfg.hidden_size, cfg.block_size
    per_frame = 0.0
    for layer in range(cfg.num_hidden_layers):
        keys = bs * (1 + int(layer in cfg.look_ahead_layers) + int(layer in cfg.look_backward_layers))
        keys = min(keys, frames)
        per_frame += 4 * D * D + 2 * D * F + 2 * keys * D
    per_frame += (cfg.mel_dim + cfg.enc_dim + cfg.emb_dim + cfg.enc_emb_dim) * D + D * cfg.mel_dim
    per_eval = 2.0 * cfg_batch * frames * per_frame
    return (steps - 1) * 4 * per_eval


def dit_inputs(cfg, num_codes: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return dict(
        codes=rng.integers(0, cfg.num_embeds, (1, num_codes)).astype(np.int64),
        cond=rng.standard_normal((1, cfg.enc_emb_dim)).astype(np.float32),
        ref_mel=rng.standard_normal((1, T_REF, cfg.mel_dim)).astype(np.float32),
        noise=rng.standard_normal((1, cfg.repeats * num_codes, cfg.mel_dim)).astype(np.float32),
        mel=(rng.standard_normal((1, cfg.mel_dim, cfg.repeats * num_codes)) - 5.0).astype(np.float32),
    )


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float], **extra) -> dict:
    return dict(median_s=statistics.median(times), times_s=[round(t, 4) for t in times], **extra)


# ============================================================================================ omni_jax workers


def matmul_gflops(dtype: str, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Median GFLOP/s of a jitted [m, k] @ [k, n] in `dtype` with float32 accumulation."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (k, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    times = _timed(lambda: f(a, b).block_until_ready(), repeats)
    return 2 * m * k * n / statistics.median(times) / 1e9


PEAK_SHAPES = {"square_2048": (2048, 2048, 2048), "dit_ff_1000x1024x2048": (1000, 1024, 2048)}


def ours_peak(args) -> dict:
    out = {}
    for dtype in ("float32", "bfloat16"):
        for name, shape in PEAK_SHAPES.items():
            out[f"{dtype}/{name}"] = round(matmul_gflops(dtype, *shape, repeats=max(5, args.repeats)), 1)
        out[f"{dtype}/peak_gflops"] = max(out[f"{dtype}/{name}"] for name in PEAK_SHAPES)
    return out


def ours_dit(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.config import RuntimeOptions
    from omni_jax.models.dit import DiT
    from omni_jax.models.flow_matching import sample_mel

    _, cfg, _ = _configs()
    inp = dit_inputs(cfg, args.codes)
    module = DiT(cfg, RuntimeOptions(dtype=args.dtype, param_dtype=args.dtype))
    frames = cfg.repeats * args.codes
    params = jax.jit(lambda k: module.init(k, jnp.zeros((1, frames, cfg.mel_dim)), jnp.zeros((1, args.codes), jnp.int32),
                                           jnp.zeros((1, cfg.enc_emb_dim)), jnp.zeros((1, T_REF, cfg.mel_dim)), 0.5))(
        jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x, nn_unbox(params))
    fn = jax.jit(lambda p, c, cond, ref, x0: sample_mel(module.apply, p, c, cond, ref, x0, num_steps=args.steps,
                                                        guidance_scale=0.5, sway_coefficient=-1.0))
    call_args = (params, jnp.asarray(inp["codes"], jnp.int32), jnp.asarray(inp["cond"]), jnp.asarray(inp["ref_mel"]),
                 jnp.asarray(inp["noise"]))
    start = time.perf_counter()
    compiled = fn.lower(*call_args).compile()
    compile_s = time.perf_counter() - start
    mel = compiled(*call_args)
    finite = bool(np.isfinite(np.asarray(mel)).all())
    times = _timed(lambda: compiled(*call_args).block_until_ready(), args.repeats)
    # the matmul peak again, in this process right after the DiT runs (the machine's load changes over a run)
    peak = max(matmul_gflops(args.dtype, *shape) for shape in PEAK_SHAPES.values())
    return _summary(times, compile_s=round(compile_s, 2), frames=frames, finite=finite, peak_gflops_here=round(peak, 1))


def ours_bigvgan(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.models.bigvgan import BigVGAN

    _, dit_cfg, cfg = _configs()
    inp = dit_inputs(dit_cfg, args.codes)
    module = BigVGAN(cfg, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.dtype))
    mel = jnp.asarray(inp["mel"])
    params = nn_unbox(jax.jit(module.init)(jax.random.key(0), mel[:, :, :8]))
    fn = jax.jit(module.apply)
    start = time.perf_counter()
    compiled = fn.lower(params, mel).compile()
    compile_s = time.perf_counter() - start
    wave = compiled(params, mel)
    finite = bool(np.isfinite(np.asarray(wave)).all())
    times = _timed(lambda: compiled(params, mel).block_until_ready(), args.repeats)
    return _summary(times, compile_s=round(compile_s, 2), samples=int(wave.shape[-1]), finite=finite)


def ours_talker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.config import RuntimeOptions
    from omni_jax.models import decode_layout
    from omni_jax.models.kv_cache import KVCache
    from omni_jax.models.talker import Talker, init_talker
    from omni_jax.sampling import SamplingParams
    from omni_jax.speech import TalkerJob, make_talker_fns

    cfg, _, _ = _configs()
    # serving layout: per-layer weights, decode unrolled over layers (as OmniModel.from_pretrained runs it)
    talker = Talker(cfg, RuntimeOptions(dtype=args.dtype, param_dtype=args.dtype, scan_layers=False))
    params = nn_unbox(jax.jit(lambda k: init_talker(talker, k))(jax.random.key(0)))["params"]
    if decode_layout.applies():  # as SpeechModel holds them for serving
        params = decode_layout.to_decode_layout(
            params, decode_layout.projection_equations(lambda: init_talker(talker, jax.random.key(0))))
    apply_fn = lambda p, e, pos, seg, cache: talker.apply({"params": p}, e, pos, seg, cache,  # noqa: E731
                                                         last_logits_only=True)
    codec_embed = lambda p, c: talker.apply({"params": p}, c, method=Talker.embed_codec)  # noqa: E731
    steps, prompt = args.talker_steps, args.talker_prompt
    unreachable_eos = (cfg.vocab_size + 7,)  # never sampled: every run decodes exactly `steps` tokens
    prefill_fn, decode_fn = make_talker_fns(apply_fn, codec_embed, max_new_tokens=steps + 1, eos_ids=unreachable_eos,
                                            pad_id=cfg.tts_codec_pad_token_id, vocab_size=cfg.vocab_size,
                                            suppress_tokens=(cfg.tts_codec_start_token_id,))
    out = {"read_bytes_per_s": read_bandwidth(), "decode_weight_bytes": talker_decode_bytes(params, cfg)}
    for batch in args.talker_batches:
        rng = np.random.default_rng(batch)
        embeds = jnp.asarray(rng.standard_normal((batch, prompt, cfg.embedding_size)) * 0.1, args.dtype)
        reply = jnp.asarray(rng.standard_normal((batch, steps + 1, cfg.embedding_size)) * 0.1, args.dtype)
        positions = jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32)[None, None], (3, batch, prompt))
        job = TalkerJob(prefill=embeds, reply=reply, positions=positions,
                        segment_ids=jnp.ones((batch, prompt), jnp.int32),
                        first_position=jnp.full((batch,), prompt, jnp.int32),
                        seen_ids=jnp.full((batch, prompt), cfg.tts_codec_mask_token_id, jnp.int32))
        sampling = SamplingParams.make(batch, HF_TALKER_SAMPLING["temperature"], HF_TALKER_SAMPLING["top_k"],
                                       HF_TALKER_SAMPLING["top_p"], HF_TALKER_SAMPLING["repetition_penalty"])

        def new_state():
            cache = KVCache.init(cfg.num_hidden_layers, batch, prompt + steps + 2, cfg.num_key_value_heads,
                                 cfg.head_dim, jnp.dtype(args.dtype))
            return jax.block_until_ready(prefill_fn(params, job, cache, jax.random.key(1), sampling))

        start = time.perf_counter()
        compiled = decode_fn.lower(params, new_state(), reply, steps).compile()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            state = new_state()
            t0 = time.perf_counter()
            state = jax.block_until_ready(compiled(params, state, reply))
            times.append(time.perf_counter() - t0)
        decoded = int(state.step) - 1  # the prefill picked the first token
        per_step = [t / decoded for t in times]
        out[f"batch{batch}"] = dict(step_s=statistics.median(per_step), steps=decoded,
                                    tokens_per_s=batch / statistics.median(per_step),
                                    times_s=[round(t, 3) for t in times], compile_s=round(compile_s, 2))
    return out


def read_bandwidth() -> float:
    """The machine's read bandwidth now (bytes/s), with bench/generate.py's probe (this VM's bandwidth moves
    between ~40 and ~80 GB/s over minutes, and batch-1 decode follows it)."""
    from generate import worker_bandwidth  # bench/ is on sys.path: this script runs as `python bench/speech.py`

    return worker_bandwidth(None)["read_bytes_per_s"]


def talker_decode_bytes(params, cfg) -> int:
    """Weight bytes one talker decode step reads: every parameter but the codec embedding table (one row)."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    return int(sum(leaf.nbytes for path, leaf in leaves
                   if not (leaf.ndim == 2 and leaf.shape[0] == cfg.vocab_size and "embed" in jax.tree_util.keystr(path))))


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


# ============================================================================================ HF workers


def _torch_setup(args):
    import torch

    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    return torch, getattr(torch, args.dtype)


def hf_dit(args) -> dict:
    from transformers import Qwen2_5OmniDiTConfig
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

    torch, dtype = _torch_setup(args)
    _, cfg, _ = _configs()
    inp = dit_inputs(cfg, args.codes)
    config = Qwen2_5OmniDiTConfig(**cfg.to_hf_config())
    config._attn_implementation = "sdpa"
    model = hf.Qwen2_5OmniToken2WavDiTModel(config).eval().to(dtype)
    cond = torch.from_numpy(inp["cond"]).to(dtype)
    ref = torch.from_numpy(inp["ref_mel"]).to(dtype)
    codes = torch.from_numpy(inp["codes"])
    with torch.inference_mode():
        run = lambda: model.sample(cond, ref, codes, num_steps=args.steps, guidance_scale=0.5,  # noqa: E731
                                   sway_coefficient=-1.0)
        if args.warmup:  # an untimed warm-up run (off by default: it is ~2 min in f32)
            run()
        times = _timed(run, args.repeats)
    return _summary(times, frames=cfg.repeats * args.codes, warmup=bool(args.warmup))


def hf_bigvgan(args) -> dict:
    from transformers import Qwen2_5OmniBigVGANConfig
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

    torch, dtype = _torch_setup(args)
    _, dit_cfg, cfg = _configs()
    inp = dit_inputs(dit_cfg, args.codes)
    model = hf.Qwen2_5OmniToken2WavBigVGANModel(Qwen2_5OmniBigVGANConfig(**cfg.to_hf_config())).eval().to(dtype)
    mel = torch.from_numpy(inp["mel"]).to(dtype)
    with torch.inference_mode():
        wave = model(mel)
        times = _timed(lambda: model(mel), args.repeats)
    return _summary(times, samples=int(wave.shape[-1]), warmup=True)


def hf_talker(args) -> dict:
    import numpy as np
    from transformers import LogitsProcessor, LogitsProcessorList, Qwen2_5OmniTalkerConfig
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

    torch, dtype = _torch_setup(args)
    cfg, _, _ = _configs()
    config = Qwen2_5OmniTalkerConfig(**cfg.to_hf_config())
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = hf.Qwen2_5OmniTalkerForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # random weights without the slow default init
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1 else 0.0) + (1.0 if "norm" in name else 0))
        for name, b in model.named_buffers():
            if "inv_freq" in name:
                dim = cfg.head_dim
                b.copy_(1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    model = model.eval().to(dtype)

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    steps, prompt = args.talker_steps, args.talker_prompt
    out = {}
    for batch in args.talker_batches:
        rng = np.random.default_rng(batch)
        embeds = torch.from_numpy(rng.standard_normal((batch, prompt + 2, cfg.embedding_size)) * 0.1).to(dtype)
        reply = torch.from_numpy(rng.standard_normal((batch, steps + 1, cfg.embedding_size)) * 0.1).to(dtype)
        ids = torch.cat([torch.full((batch, prompt), cfg.tts_codec_mask_token_id),
                         torch.full((batch, 1), cfg.tts_codec_pad_token_id),
                         torch.full((batch, 1), cfg.tts_codec_start_token_id)], dim=1)
        text_ids = torch.full((batch, prompt + 2), 100)
        per_step, totals = [], []
        for _ in range(args.repeats):
            clock = Clock()
            model.rope_deltas = None
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=ids, input_text_ids=text_ids, thinker_reply_part=reply.clone(),
                               inputs_embeds=embeds.clone(), attention_mask=torch.ones_like(ids),
                               suppress_tokens=[cfg.tts_codec_start_token_id], max_new_tokens=steps,
                               min_new_tokens=steps, eos_token_id=cfg.tts_codec_end_token_id,
                               logits_processor=LogitsProcessorList([clock]), **HF_TALKER_SAMPLING)
            totals.append(time.perf_counter() - t0)
            gaps = np.diff(clock.stamps)  # step k's forward + sampling, k >= 2 (step 1 includes the prefill)
            per_step.append(float(np.median(gaps)))
        out[f"batch{batch}"] = dict(step_s=statistics.median(per_step), steps=len(clock.stamps) - 1,
                                    tokens_per_s=batch / statistics.median(per_step),
                                    step_s_runs=[round(t, 4) for t in per_step],
                                    total_s_runs=[round(t, 2) for t in totals])
    return out


WORKERS = {("ours", "peak"): ours_peak, ("ours", "dit"): ours_dit, ("ours", "bigvgan"): ours_bigvgan,
           ("ours", "talker"): ours_talker, ("hf", "dit"): hf_dit, ("hf", "bigvgan"): hf_bigvgan,
           ("hf", "talker"): hf_talker}


# ============================================================================================ driver


def run_worker(args, impl: str, part: str, dtype: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, part, dtype, out_path, "--preset", args.preset,
           "--codes", str(args.codes), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--talker-steps", str(args.talker_steps), "--talker-prompt", str(args.talker_prompt),
           "--talker-batches", ",".join(map(str, args.talker_batches)), "--threads", str(args.threads)]
    if args.warmup:
        cmd.append("--warmup")
    print(f"[bench] {impl} {part} {dtype} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return dict(error=f"worker exited with {proc.returncode}", wall_s=round(wall, 1))
    with open(out_path) as f:
        result = json.load(f)
    os.unlink(out_path)
    result["wall_s"] = round(wall, 1)
    print(f"[bench] {impl} {part} {dtype}: {json.dumps(result)}", flush=True)
    return result


def best_talker_round(results: list[dict]) -> dict:
    """One talker entry from several rounds of a worker: per batch the round with the most tokens/s, the highest
    read bandwidth measured (the bound), and every round's rates under "rounds"."""
    ok = [r for r in results if "error" not in r] or results[:1]
    best = dict(ok[0])
    for key in [k for k in best if k.startswith("batch")]:
        best[key] = max((r[key] for r in ok), key=lambda entry: entry["tokens_per_s"])
    if "read_bytes_per_s" in best:
        best["read_bytes_per_s"] = max(r["read_bytes_per_s"] for r in ok)
    best["rounds"] = [{k: r[k]["tokens_per_s"] for k in r if k.startswith("batch")} for r in ok]
    return best


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"results": {}}


def _get(results, impl, part, dtype, *keys):
    node = results.get(f"{impl}/{part}/{dtype}")
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown_table(data: dict) -> str:
    from omni_jax.config import OmniConfig

    res, meta = data["results"], data.get("meta", {})
    codes, steps = meta.get("codes", 250), meta.get("steps", 10)
    audio_s = codes * AUDIO_SECONDS_PER_CODE
    dit_cfg = OmniConfig.from_yaml(meta.get("preset", PRESET)).token2wav.dit
    flops = dit_flops(dit_cfg, dit_cfg.repeats * codes, steps)
    lines = [f"Token2Wav for {codes} codec tokens ({audio_s:g} s of speech, {dit_cfg.repeats * codes} mel frames), "
             f"{steps} ODE time points, CFG; DiT useful FLOPs per sample {flops / 1e12:.2f} TFLOP.", ""]
    lines += ["| dtype | part | HF (s) | omni_jax (s) | speed-up vs HF | target | met | omni_jax compile (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for dtype in ("float32", "bfloat16"):
        hf_d, us_d = _get(res, "hf", "dit", dtype, "median_s"), _get(res, "ours", "dit", dtype, "median_s")
        hf_v, us_v = _get(res, "hf", "bigvgan", dtype, "median_s"), _get(res, "ours", "bigvgan", dtype, "median_s")
        rows = [("DiT", hf_d, us_d, None, _get(res, "ours", "dit", dtype, "compile_s")),
                ("BigVGAN", hf_v, us_v, None, _get(res, "ours", "bigvgan", dtype, "compile_s"))]
        hf_t = hf_d + hf_v if hf_d is not None and hf_v is not None else None
        us_t = us_d + us_v if us_d is not None and us_v is not None else None
        rows.append(("Token2Wav", hf_t, us_t, 1.3, None))
        for name, h, u, target, comp in rows:
            ratio = h / u if h and u else None
            met = "-" if target is None or ratio is None else ("yes" if ratio >= target else "no")
            lines.append(f"| {dtype} | {name} | {_fmt(h)} | {_fmt(u)} | {_fmt(ratio)}x | "
                         f"{'>= %.1fx' % target if target else ''} | {met} | {_fmt(comp, '.1f')} |")
    lines += ["", "| dtype | Token2Wav RTF HF | RTF omni_jax | DiT achieved GFLOP/s | matmul peak GFLOP/s (DiT worker) | "
              "% of peak (target >= 60%) |", "|---|---|---|---|---|---|"]
    for dtype in ("float32", "bfloat16"):
        hf_t = [_get(res, "hf", p, dtype, "median_s") for p in ("dit", "bigvgan")]
        us_t = [_get(res, "ours", p, dtype, "median_s") for p in ("dit", "bigvgan")]
        hf_rtf = sum(hf_t) / audio_s if None not in hf_t else None
        us_rtf = sum(us_t) / audio_s if None not in us_t else None
        achieved = flops / us_t[0] / 1e9 if us_t[0] else None
        # the peak measured in the DiT worker right after its runs (same load); else the separate peak run
        peak = (_get(res, "ours", "dit", dtype, "peak_gflops_here")
                or _get(res, "ours", "peak", "all", f"{dtype}/peak_gflops"))
        pct = 100 * achieved / peak if achieved and peak else None
        lines.append(f"| {dtype} | {_fmt(hf_rtf)} | {_fmt(us_rtf)} | {_fmt(achieved, '.1f')} | {_fmt(peak, '.1f')} | "
                     f"{_fmt(pct, '.0f')}% |")
    lines += ["", "| dtype | talker batch | HF tokens/s | omni_jax tokens/s | ratio | target >= 2x met |",
              "|---|---|---|---|---|---|"]
    for dtype in ("float32", "bfloat16"):
        for batch in meta.get("talker_batches", [1, 8]):
            h = _get(res, "hf", "talker", dtype, f"batch{batch}", "tokens_per_s")
            u = _get(res, "ours", "talker", dtype, f"batch{batch}", "tokens_per_s")
            ratio = u / h if h and u else None
            lines.append(f"| {dtype} | {batch} | {_fmt(h)} | {_fmt(u)} | {_fmt(ratio)}x | "
                         f"{'-' if ratio is None else ('yes' if ratio >= 2 else 'no')} |")
    for dtype in ("float32", "bfloat16"):
        bw = _get(res, "ours", "talker", dtype, "read_bytes_per_s")
        nbytes = _get(res, "ours", "talker", dtype, "decode_weight_bytes")
        u = _get(res, "ours", "talker", dtype, "batch1", "tokens_per_s")
        if bw and nbytes and u:
            bound = bw / nbytes
            lines.append(f"\nTalker {dtype} batch 1: read bandwidth {bw / 1e9:.1f} GB/s in ours' worker (the faster of "
                         f"4 KiB and huge pages), "
                         f"{nbytes / 1e9:.2f} GB of weights a step: bound {bound:.2f} tok/s, ours at "
                         f"{100 * u / bound:.0f}% of it.")
    peak = res.get("ours/peak/all", {})
    if peak:
        lines += ["", "Matmul GFLOP/s (jitted jnp.dot): " + ", ".join(f"{k} {v}" for k, v in sorted(peak.items())
                                                                      if "gflops" not in k and k != "wall_s")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="peak,dit,bigvgan,talker")
    p.add_argument("--preset", default=PRESET, help="model config (the released 7B dims by default)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default="hf,ours")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--codes", type=int, default=250)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--talker-steps", type=int, default=32)
    p.add_argument("--talker-prompt", type=int, default=64)
    p.add_argument("--talker-batches", default="1,8")
    p.add_argument("--rounds", type=int, default=1,
                   help="talker: run the workers this many times in turn (hf, ours, hf, ...); best per batch")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--warmup", action="store_true", help="an untimed HF DiT run first")
    p.add_argument("--json", default=os.path.join(ROOT, "bench/results/speech.json"))
    p.add_argument("--markdown", default=None, help="the table (default: --json with .md in place of .json)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--worker", nargs=4, metavar=("IMPL", "PART", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.talker_batches = [int(b) for b in str(args.talker_batches).split(",")]
    args.markdown = args.markdown or os.path.splitext(args.json)[0] + ".md"
    os.environ["SPEECH_BENCH_PRESET"] = args.preset  # read by the workers (inherited environment)

    if args.worker:
        impl, part, dtype, out_path = args.worker
        args.dtype = dtype
        result = WORKERS[(impl, part)](args)
        with open(out_path, "w") as f:
            json.dump(result, f)
        return

    def record(key, value):  # re-read first: several invocations may fill the same file (one per impl, say)
        data = _load(args.json)
        data.setdefault("results", {})[key] = value
        data["meta"] = meta
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)

    if not args.table_only:
        meta = dict(preset=args.preset, codes=args.codes, steps=args.steps, repeats=args.repeats, t_ref=T_REF,
                    talker_steps=args.talker_steps, talker_prompt=args.talker_prompt,
                    talker_batches=args.talker_batches, cpus=os.cpu_count(), load_avg_start=os.getloadavg(),
                    time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        parts = args.parts.split(",")
        if "peak" in parts and "ours" in args.impls.split(","):
            record("ours/peak/all", run_worker(args, "ours", "peak", "float32"))
        for part in [q for q in parts if q != "peak"]:
            rounds = args.rounds if part == "talker" else 1
            runs = {}
            for _ in range(rounds):
                for dtype in args.dtypes.split(","):
                    for impl in args.impls.split(","):
                        result = run_worker(args, impl, part, dtype)
                        result["load_avg_after"] = os.getloadavg()
                        runs.setdefault((impl, dtype), []).append(result)
            for (impl, dtype), results in runs.items():
                record(f"{impl}/{part}/{dtype}", results[0] if len(results) == 1 else best_talker_round(results))
    data = _load(args.json)
    table = markdown_table(data)
    os.makedirs(os.path.dirname(args.markdown), exist_ok=True)
    with open(args.markdown, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
