"""`omni-jax compile`: settings from flags (and a train or model YAML) -> topology, mesh, program -> compile ->
report. Exit codes: 0 fits, 3 does not fit (or the compiler ran out of HBM), 2 a bad request (unknown topology,
a mesh that does not match the chips, shapes that do not split)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Optional

EXIT_FITS, EXIT_BAD_REQUEST, EXIT_DOES_NOT_FIT = 0, 2, 3
DEFAULT_ATTENTION_BACKEND = "pallas"  # the TPU kernel (models/attention.py); "xla" is the portable fallback


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything that decides the compiled program, after YAML defaults and flags are merged."""

    job: str
    config: object  # OmniConfig
    batch: int
    seq_len: int
    max_len: int
    grad_accum: int
    mesh: Optional[dict]
    dtype: str
    param_dtype: str
    attention_backend: str
    remat_policy: str
    scan_layers: bool
    train: object  # programs.TrainSettings
    page_size: int = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v6e:4x4, v5p:2x2x1, v4:2x2x1")
    p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (the data axis crosses them)")
    p.add_argument("--job", required=True,
                   choices=("train", "prefill", "decode", "paged-decode", "talker-decode", "token2wav"))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-config", help="model preset YAML, e.g. configs/models/qwen2_5_omni_7b.yaml")
    source.add_argument("--train-config", help="train YAML: model, data lengths, mesh, dtypes, remat, optimizer")
    source.add_argument("--serve-config", help="serving preset YAML (configs/serve/): model, dtype, mesh and the "
                                               "shapes of each serving job")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. thinker.text.num_hidden_layers=4 (repeatable)")
    p.add_argument("--seq-len", type=int, help="train row length / prompt length (talker-decode: the talker "
                   "prompt; token2wav: the voice's reference mel frames, default 300) (default: the train YAML's, "
                   "else 1024)")
    p.add_argument("--batch", type=int, help="global rows (default: the train YAML's batch_size, else 8)")
    p.add_argument("--grad-accum", type=int, help="train microbatches per step (default: the YAML's, else 1)")
    p.add_argument("--max-len", type=int, help="prefill/decode KV cache slots; paged-decode: the longest row "
                                                "(default: 2 x seq-len)")
    p.add_argument("--page-size", type=int, help="paged-decode: tokens per KV cache page (default: the preset's, "
                                                 "else 64); --seq-len is then the tokens per slot on average")
    p.add_argument("--dtype", help="compute dtype (default: the YAML's, else bfloat16)")
    p.add_argument("--param-dtype", help="weights (default: train float32 master weights; serving = --dtype)")
    p.add_argument("--mesh", help="data=..,fsdp=..,tensor=.. (one may be -1; default: the YAML's, else "
                                  "data=num-slices, fsdp=rest)")
    p.add_argument("--attention-backend", choices=("xla", "pallas"),
                   help=f"default: the train YAML's, else {DEFAULT_ATTENTION_BACKEND}")
    p.add_argument("--remat", help="remat policy: none|full|dots|dots_with_no_batch_dims (default: the YAML's, "
                                   "else none)")
    p.add_argument("--scan-layers", choices=("yes", "no"),
                   help="text decoder as one scanned layer (default: yes for train, no for prefill/decode, as "
                        "training and serving build it)")
    p.add_argument("--media-buckets", metavar="audio_chunks=N,image_patches=N,video_patches=N",
                   help="train: encoder inputs in every step, as the train YAML's data.media_buckets (default: the "
                        "YAML's, else none: a text-only step)")
    p.add_argument("--hbm-gib", type=float, help="HBM per chip, for chips the tool does not know")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON here")


MEDIA_BUCKET_KEYS = ("audio_chunks", "image_patches", "video_patches")


def parse_media_buckets(text: str) -> dict:
    """"audio_chunks=64,video_patches=4096" -> {"audio_chunks": 64, "video_patches": 4096}."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, size = item.partition("=")
        if name.strip() not in MEDIA_BUCKET_KEYS or not size.strip().isdigit():
            raise ValueError(f"--media-buckets {text!r}: expected comma-separated NAME=COUNT with NAME in "
                             f"{', '.join(MEDIA_BUCKET_KEYS)}")
        out[name.strip()] = int(size)
    return out


def _request(args) -> "Request":
    from omni_jax.config import OmniConfig, apply_overrides
    from omni_jax.tpu_compile.programs import TrainSettings
    from omni_jax.tpu_compile.topology import parse_mesh

    train_cfg = serve_cfg = None
    serve_shape: dict = {}
    if args.serve_config:
        from serve.preset import ServePreset  # lazy, as the train YAML

        serve_cfg = ServePreset.from_yaml(args.serve_config)
        if args.job == "train":
            raise ValueError("--serve-config describes serving programs; compile --job train with --train-config")
        serve_shape = serve_cfg.shape(args.job)
        config = apply_overrides(OmniConfig.from_yaml(serve_cfg.model_config), list(serve_cfg.overrides))
    elif args.train_config:
        from train.config import TrainConfig  # lazy, as omni_jax/cli.py's train command

        train_cfg = TrainConfig.from_yaml(args.train_config)
        if train_cfg.model.init_from:
            config = OmniConfig.from_pretrained(train_cfg.model.init_from)
        else:
            config = apply_overrides(OmniConfig.from_yaml(train_cfg.model.config), list(train_cfg.model.overrides))
    else:
        config = OmniConfig.from_yaml(args.model_config)
    if args.override:
        config = apply_overrides(config, list(args.override))

    def pick(flag, from_yaml, default):
        if flag is not None:
            return flag
        return from_yaml if train_cfg is not None and from_yaml is not None else default

    if serve_cfg is not None:  # the preset's values stand where a flag is not given
        for key in ("batch", "seq_len", "max_len", "page_size"):
            if getattr(args, key) is None and key in serve_shape:
                setattr(args, key, serve_shape[key])
        for key, value in (("dtype", serve_cfg.dtype), ("attention_backend", serve_cfg.attention_backend),
                           ("mesh", ",".join(f"{k}={v}" for k, v in serve_cfg.mesh.items()) or None)):
            if getattr(args, key) is None:
                setattr(args, key, value)

    model = train_cfg.model if train_cfg else None
    data = train_cfg.data if train_cfg else None
    if args.job == "token2wav" and args.seq_len is None:
        from omni_jax.tpu_compile.programs import REF_MEL_FRAMES

        seq_len = REF_MEL_FRAMES
    else:
        seq_len = pick(args.seq_len, data and data.seq_len, 1024)
    dtype = pick(args.dtype, model and model.dtype, "bfloat16")
    serving = args.job != "train"
    param_dtype = args.param_dtype or (dtype if serving else model.param_dtype if model else "float32")
    mesh = parse_mesh(args.mesh) if args.mesh else (dict(train_cfg.mesh) if train_cfg else None)
    train = TrainSettings()
    if train_cfg is not None:
        train = TrainSettings(optim=train_cfg.optim, total_steps=train_cfg.train.steps,
                              max_loss_tokens=train_cfg.train.max_loss_tokens, loss_chunk=train_cfg.train.loss_chunk,
                              freeze=tuple(train_cfg.train.freeze),
                              media_buckets=dict(train_cfg.data.media_buckets) or None)
        if train_cfg.train.talker_loss_weight > 0 and args.job == "train":
            print("note: this run also trains the talker (train.talker_loss_weight > 0); the compiled step is the "
                  "thinker's only", file=sys.stderr)
    if args.media_buckets:
        train = dataclasses.replace(train, media_buckets=parse_media_buckets(args.media_buckets))
    grad_accum = 1 if serving else pick(args.grad_accum, data and data.grad_accum, 1)
    return Request(
        job=args.job, config=config, batch=pick(args.batch, data and data.batch_size, 8), seq_len=seq_len,
        max_len=args.max_len or 2 * seq_len, grad_accum=grad_accum,
        mesh=mesh, dtype=dtype, param_dtype=param_dtype,
        attention_backend=pick(args.attention_backend, model and model.attention_backend, DEFAULT_ATTENTION_BACKEND),
        remat_policy=pick(args.remat, model and model.remat_policy, "none"),
        scan_layers=(args.scan_layers == "yes") if args.scan_layers else not serving, train=train,
        page_size=args.page_size or 64)


def run(args) -> int:
    """The compile subcommand; jax must not have initialised a backend other than the CPU before this."""
    from omni_jax.tpu_compile import programs, report as reports
    from omni_jax.tpu_compile.topology import TopologyError, load_topology, slice_mesh

    try:
        request = _request(args)
        tpu = load_topology(args.topology, args.num_slices, hbm_gib=args.hbm_gib)
        mesh = slice_mesh(tpu, request.mesh)
        options = programs.runtime_options(request.dtype, request.param_dtype, request.attention_backend,
                                           request.remat_policy, request.scan_layers)
        shape = programs.JobShape(batch=request.batch, seq_len=request.seq_len, max_len=request.max_len,
                                  grad_accum=request.grad_accum, page_size=request.page_size)
        start = time.perf_counter()
        program = programs.build_program(request.job, request.config, options, mesh, shape, request.train)
    except (TopologyError, programs.JobError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_REQUEST

    fields = dict(job=request.job, topology=tpu.name, num_slices=tpu.num_slices, device_kind=tpu.device_kind,
                  chips=tpu.num_devices, mesh=dict(mesh.shape), shapes=program.shapes,
                  options={"dtype": options.dtype, "param_dtype": options.param_dtype,
                           "attention_backend": options.attention_backend, "remat_policy": options.remat_policy,
                           "scan_layers": options.scan_layers},
                  hbm_bytes=tpu.hbm_bytes)
    try:
        compiled = program.lower().compile()
        result = reports.build_report(compiled, compile_s=time.perf_counter() - start, program=program, **fields)
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
        if not reports.is_out_of_memory(e):
            raise
        result = reports.out_of_memory_report(e, compile_s=time.perf_counter() - start, **fields)
    print(result.table())
    if args.json:
        result.write_json(args.json)
    if result.fits is False:
        print(result.shortfall_message)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS
