"""The train loop: config -> mesh -> model -> data -> steps -> eval -> checkpoints -> final export.

    from train.config import TrainConfig
    from train.loop import train
    summary = train(TrainConfig.from_yaml("configs/train/toy.yaml"), "/tmp/run")

Running it again on the same workdir resumes from the latest checkpoint in WORKDIR/checkpoints/ (params,
optimizer state, step, RNG and the data iterator's position), so an interrupted run continues exactly where
its last checkpoint left it. Multi-host: every process runs this same function (jax.distributed is initialized
from the environment, see omni_jax.sharding.maybe_initialize_distributed); each feeds its shard of the data
and its rows of the global batch.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from omni_jax.config import OmniConfig, RuntimeOptions, apply_overrides
from omni_jax.models.talker import Talker, init_talker
from omni_jax.models.thinker import Thinker, init_thinker
from omni_jax.sharding import make_mesh, maybe_initialize_distributed
from train.batches import device_batch
from train.checkpointing import Checkpoints
from train.config import TrainConfig
from train.metrics import MetricsWriter, measure_matmul_peak, plot_loss_curve, train_flops_per_token
from train.step import Trainer, lr_schedule, make_optimizer, module_labels

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """K consecutive steps had a non-finite loss or gradient."""


# ================================================================================================ model
def _model_config(cfg: TrainConfig) -> OmniConfig:
    if cfg.model.init_from:
        return OmniConfig.from_pretrained(cfg.model.init_from)
    return apply_overrides(OmniConfig.from_yaml(cfg.model.config), list(cfg.model.overrides))


def _initial_params(cfg: TrainConfig, config: OmniConfig, thinker: Thinker) -> dict:
    """{"thinker": host or device arrays}: from model.init_from, or random (model.seed)."""
    if cfg.model.init_from:
        from omni_jax.checkpoint import load_params
        from omni_jax.hf_mapping import load_hf_params

        path = cfg.model.init_from
        if os.path.exists(os.path.join(path, "omni_jax.json")):
            params = load_params(os.path.join(path, "params"))
        else:
            params = load_hf_params(path, config, thinker_only=True)
        return {"thinker": params["thinker"]}
    variables = jax.jit(lambda rng: init_thinker(thinker, rng))(jax.random.key(cfg.model.seed))
    return {"thinker": nn.meta.unbox(variables)["params"]}


def _train_talker(cfg: TrainConfig, config: OmniConfig) -> bool:
    """Whether this run trains the talker (train.talker_loss_weight > 0); a clear error when it cannot."""
    if cfg.train.talker_loss_weight <= 0:
        return False
    if config.talker is None or config.token2wav is None or not config.enable_audio_output:
        raise ValueError("train.talker_loss_weight > 0 needs a model with a talker (talker_config and "
                         "enable_audio_output); this one has none; set train.talker_loss_weight=0")
    if cfg.data.dataset != "omni_toy":
        raise ValueError(f"train.talker_loss_weight > 0 needs codec targets, which only omni_toy records carry "
                         f"(data.dataset is {cfg.data.dataset!r}); set train.talker_loss_weight=0")
    return True


def _initial_talker(cfg: TrainConfig, config: OmniConfig, talker: Talker):
    """Talker params: from model.init_from, or the random init `init_model.init_params` gives (model.seed)."""
    src = cfg.model.init_from
    if src:
        from omni_jax.checkpoint import load_params
        from omni_jax.hf_mapping import load_hf_params

        if os.path.exists(os.path.join(src, "omni_jax.json")):
            params = load_params(os.path.join(src, "params"))
        else:
            params = load_hf_params(src, config, thinker_only=False)
        if "talker" not in params:
            raise ValueError(f"model.init_from {src} has no talker weights (thinker-only?); the talker loss "
                             "needs them (or set train.talker_loss_weight=0)")
        return params["talker"]
    key = jax.random.split(jax.random.key(cfg.model.seed), 4)[1]  # the talker's key in init_model.init_params
    return nn.meta.unbox(jax.jit(lambda rng: init_talker(talker, rng))(key))["params"]


def _voices(cfg: TrainConfig, config: OmniConfig) -> dict:
    """The voices the exported checkpoint will carry: model.init_from's, or the random demo voices."""
    from omni_jax.init_model import random_voices
    from omni_jax.voices import read_voices

    src = cfg.model.init_from
    return read_voices(src) if src else random_voices(config, cfg.model.seed)


def _talker_layout(cfg: TrainConfig, config: OmniConfig):
    """The packer's TalkerLayout: Lt = data.talker_seq_len, speaker bos of train.talker_speaker."""
    from omni_jax.data.talker_view import TalkerLayout

    voices = _voices(cfg, config)
    if not voices:
        raise ValueError(f"the talker loss needs a voice (its speaker bos id); {cfg.model.init_from} has none")
    name = cfg.train.talker_speaker or next(iter(voices))
    if name not in voices:
        raise ValueError(f"train.talker_speaker {name!r} is not a voice of this model; known: {sorted(voices)}")
    return TalkerLayout.from_config(config.talker, cfg.data.talker_length, voices[name].bos_token)


def _processor(cfg: TrainConfig, workdir: str):
    from omni_jax.processing.processor import Processor
    from omni_jax.processing.tokenizer import write_qwen_tokenizer

    src = cfg.model.init_from
    if src and any(os.path.exists(os.path.join(src, f)) for f in ("tokenizer.json", "vocab.json")):
        return Processor.from_pretrained(src), src
    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        if jax.process_index() == 0:
            shutil.rmtree(tok_dir + ".tmp", ignore_errors=True)
            write_qwen_tokenizer(tok_dir + ".tmp")
            shutil.rmtree(tok_dir, ignore_errors=True)  # a partial one from an interrupted run
            os.replace(tok_dir + ".tmp", tok_dir)
        _barrier("tokenizer")
    return Processor.from_pretrained(tok_dir), tok_dir


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_params(params: Any) -> Any:
    """Sharded (possibly multi-process) arrays -> full numpy arrays on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


# ================================================================================================ data
def _data_iterator(cfg: TrainConfig, processor, micro_rows: int, split: str, num_epochs=None, seed=None,
                   talker=None):
    seed = cfg.train.seed if seed is None else seed
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if cfg.data.dataset == "synthetic_count":
        from train import synthetic_data

        extra = dict(cfg.data.pipeline)
        return synthetic_data.make_train_iterator(seq_len=cfg.data.seq_len, batch_size=micro_rows, seed=seed,
                                                  split=split, **extra, **shard)
    from omni_jax.data.pipeline import make_dataset

    return iter(make_dataset(cfg.data.pipeline_config(split), processor=processor, seq_len=cfg.data.seq_len,
                             batch_size=micro_rows, seed=seed, num_epochs=num_epochs, split=split, talker=talker,
                             **shard))


def _check_loss_tokens(micro: list, cap: int, step: int) -> None:
    """With train.max_loss_tokens, every microbatch must fit (per process; its rows of the global batch)."""
    if not cap:
        return
    for i, m in enumerate(micro):
        count = int((np.asarray(m["loss_mask"]) > 0).sum())
        if count * jax.process_count() > cap:
            raise ValueError(f"step {step}, microbatch {i}: {count} loss tokens on this process "
                             f"(x{jax.process_count()} processes) exceed train.max_loss_tokens = {cap}; raise it")


# ================================================================================================ eval
def _eval_loss(cfg, trainer, state, processor, thinker_config, micro_rows, mesh, talker=None) -> dict:
    """{"eval_loss": thinker loss, "eval_talker_loss": talker loss (when trained)} over eval.num_batches."""
    if cfg.eval.num_batches <= 0:
        return {}
    it = _data_iterator(cfg, processor, micro_rows, cfg.data.eval_split, num_epochs=None, seed=cfg.train.seed + 1,
                        talker=talker)
    sums = {"loss_sum": 0.0, "tokens": 0.0, "talker_loss_sum": 0.0, "talker_tokens": 0.0}
    for i in range(cfg.eval.num_batches):
        micro = [next(it)]
        _check_loss_tokens(micro, cfg.train.max_loss_tokens, -1)
        batch = device_batch(micro, thinker_config, mesh, cfg.data.media_buckets)
        for key, value in trainer.eval_loss_sums(state.params, batch).items():
            sums[key] += float(value)
    out = {"eval_loss": sums["loss_sum"] / max(sums["tokens"], 1.0)}
    if sums["talker_tokens"]:
        out["eval_talker_loss"] = sums["talker_loss_sum"] / sums["talker_tokens"]
    return out


def _eval_accuracy(cfg, params_host, config, processor, examples) -> Optional[dict]:
    """Greedy generation on the eval examples; the first word of the reply against the reference answer."""
    if not examples or jax.process_index() != 0:
        return None
    from omni_jax.api import OmniModel
    from omni_jax.data.toy_task import CHANCE, normalize_answer

    model = OmniModel(config, {"thinker": params_host["thinker"]}, RuntimeOptions(), tokenizer=processor.tokenizer)
    correct, chance, per_task = 0, 0.0, {}
    for flag in (False, True):
        group = [e for e in examples if bool(e["use_audio_in_video"]) == flag]
        for start in range(0, len(group), cfg.eval.batch_size):
            chunk = group[start:start + cfg.eval.batch_size]
            batch = processor([e["conversation"] for e in chunk], use_audio_in_video=flag)
            out = model.generate(batch, max_new_tokens=cfg.eval.max_new_tokens, use_audio_in_video=flag)
            for e, text in zip(chunk, out.text):
                ok = normalize_answer(text or "") == normalize_answer(e["answer"])
                correct += ok
                chance += CHANCE.get(e["task"], 0.0)
                hit = per_task.setdefault(e["task"], [0, 0])
                hit[0] += ok
                hit[1] += 1
    n = len(examples)
    return {"eval_accuracy": correct / n, "eval_chance": chance / n,
            **{f"eval_accuracy_{t}": h[0] / h[1] for t, h in per_task.items()}}


def _eval_examples(cfg) -> list:
    if cfg.eval.num_examples <= 0 or cfg.data.dataset != "omni_toy" or jax.process_index() != 0:
        return []
    from omni_jax.data.pipeline import make_eval_examples

    return make_eval_examples(cfg.data.pipeline_config(cfg.data.eval_split), split=cfg.data.eval_split,
                              limit=cfg.eval.num_examples)


# ================================================================================================ export
def export_checkpoint(cfg: TrainConfig, config: OmniConfig, params_host: dict, out_dir: str, tokenizer_dir: str):
    """An omni_jax checkpoint dir (config.json, params/, omni_jax.json, tokenizer, voices) with the trained
    thinker (and talker, when params_host has one), loadable by OmniModel.from_pretrained / `omni-jax generate`
    and exportable by `omni-jax export`. Parts not trained here (talker without the talker loss, token2wav,
    voices) come from model.init_from, or are random (model.seed) for a random-init run whose config has
    speech output."""
    from omni_jax.checkpoint import load_params, save_params

    params = {"thinker": params_host["thinker"]}
    speech = config.talker is not None and config.token2wav is not None and config.enable_audio_output
    src = cfg.model.init_from
    voices_src = None
    if speech and src and os.path.exists(os.path.join(src, "omni_jax.json")):
        full = load_params(os.path.join(src, "params"))
        params.update({k: v for k, v in full.items() if k != "thinker"})
        voices_src = src
    elif speech and src:  # an HF directory: its talker, Token2Wav and voices (spk_dict.pt)
        from omni_jax.hf_mapping import load_hf_params

        full = load_hf_params(src, config, thinker_only=False)
        params.update({k: v for k, v in full.items() if k != "thinker"})
        voices_src = src
    elif speech and not src:
        from omni_jax.init_model import init_params, random_voices

        full = init_params(config, cfg.model.seed)
        params.update({k: v for k, v in full.items() if k != "thinker"})
    if "talker" in params_host:  # trained here
        params["talker"] = params_host["talker"]
    speech = "talker" in params
    tmp = out_dir + ".tmp"
    if jax.process_index() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    _barrier("export-start")
    save_params(os.path.join(tmp, "params"), params, overwrite=True)
    if jax.process_index() == 0:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf_config(), f, indent=2)
        with open(os.path.join(tmp, "omni_jax.json"), "w") as f:
            json.dump({"format_version": 1, "source": f"omni-jax train ({src or cfg.model.config})",
                       "thinker_only": not speech}, f, indent=2)
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
                shutil.copy(os.path.join(tokenizer_dir, name), tmp)
        if speech:
            from omni_jax.voices import read_voices, write_voices

            voices = read_voices(voices_src) if voices_src else random_voices(config, cfg.model.seed)
            write_voices(tmp, voices)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    _barrier("export-done")
    return out_dir


# ================================================================================================ loop
def train(cfg: TrainConfig, workdir: str) -> dict:
    """Train (or resume) in `workdir`; returns a summary dict (final step, losses, eval results, paths)."""
    maybe_initialize_distributed()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    nproc = jax.process_count()
    k = cfg.data.grad_accum
    if cfg.data.batch_size % (k * nproc):
        raise ValueError(f"data.batch_size {cfg.data.batch_size} must divide into grad_accum {k} x "
                         f"{nproc} processes")
    micro_rows = cfg.data.batch_size // (k * nproc)  # rows this process feeds per microbatch
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "train_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2, default=list)

    config = _model_config(cfg)
    options = RuntimeOptions(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                             attention_backend=cfg.model.attention_backend, remat_policy=cfg.model.remat_policy)
    thinker = Thinker(config.thinker, options)
    mesh = make_mesh(cfg.mesh)
    rows_per_shard = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.data.batch_size // k) % rows_per_shard:
        raise ValueError(f"microbatch of {cfg.data.batch_size // k} rows does not split over data x fsdp = "
                         f"{rows_per_shard} devices")
    abstract = {"thinker": nn.meta.unbox(jax.eval_shape(lambda: init_thinker(thinker, jax.random.key(0)))["params"])}
    talker = layout = None
    if _train_talker(cfg, config):
        talker = Talker(config.talker, options)
        abstract["talker"] = nn.meta.unbox(jax.eval_shape(lambda: init_talker(talker, jax.random.key(0)))["params"])
        layout = _talker_layout(cfg, config)
    labels = module_labels(abstract, cfg.train.freeze)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, labels)
    trainer = Trainer(thinker, optimizer, mesh, max_loss_tokens=cfg.train.max_loss_tokens, talker=talker,
                      loss_chunk=cfg.train.loss_chunk, freeze=tuple(cfg.train.freeze),
                      talker_loss_weight=cfg.train.talker_loss_weight,
                      talker_thinker_grad=cfg.train.talker_thinker_grad)
    processor, tokenizer_dir = _processor(cfg, workdir)
    data = _data_iterator(cfg, processor, micro_rows, cfg.data.split, talker=layout)

    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
    start = ckpts.latest_step()
    if start is None:
        params = _initial_params(cfg, config, thinker)
        if talker is not None:
            params["talker"] = _initial_talker(cfg, config, talker)
        state = trainer.init_state(params, seed=cfg.train.seed)
        start = 0
        log.info("starting from step 0")
    else:
        state, _ = ckpts.restore(start, trainer.abstract_state, data)
        log.info("resumed from %s at step %d", ckpts.directory, start)
    metrics = MetricsWriter(workdir, tensorboard=cfg.train.tensorboard, resume_step=start)
    schedule = lr_schedule(cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.end_lr_ratio)
    head_everywhere = not cfg.train.max_loss_tokens
    flops_per_token = train_flops_per_token(config.thinker.text, cfg.data.seq_len, include_head=head_everywhere)
    head_flops = 6.0 * config.thinker.text.hidden_size * config.thinker.text.vocab_size  # per head position
    peak = cfg.train.peak_flops or (measure_matmul_peak(cfg.model.dtype) if cfg.train.progress else 0.0)
    peak_total = peak * jax.device_count()
    examples = _eval_examples(cfg)
    summary: dict[str, Any] = {"workdir": workdir, "resumed_from": start, "first_loss": None, "last_loss": None}

    bar = None
    if cfg.train.progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True)

    def run_eval(step: int):
        record = {"step": step}
        record.update(_eval_loss(cfg, trainer, state, processor, config.thinker, cfg.data.batch_size // nproc, mesh,
                                 talker=layout))
        if examples:
            record.update(_eval_accuracy(cfg, host_params(state.params), config, processor, examples) or {})
        if len(record) > 1:
            metrics.write(record)
            summary.setdefault("evals", []).append(record)
            if bar is not None:
                bar.write("eval " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in record.items()}))

    pending = None  # (step, metrics on device, dispatch time): read one step late (no per-step host sync)
    last_time = time.perf_counter()

    def finish(entry):
        nonlocal last_time
        step, m, _ = entry
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        tokens = cfg.data.batch_size * cfg.data.seq_len
        record = {"step": step, "loss": float(m["loss"]),
                  **{key: float(m[key]) for key in ("thinker_loss", "talker_loss") if key in m},
                  "grad_norm": float(m["grad_norm"]),
                  "lr": float(schedule(step - 1)), "loss_tokens": float(m["tokens"]), "step_time_s": dt,
                  "tokens_per_s": tokens / dt}
        if peak_total:
            head = 0.0 if head_everywhere else head_flops * min(cfg.train.max_loss_tokens * k, tokens)
            record["mfu"] = (flops_per_token * tokens + head) / dt / peak_total
        if not bool(m["finite"]):
            record["skipped_nonfinite"] = True
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics.write(record)
        if summary["first_loss"] is None:
            summary["first_loss"] = record["loss"]
            if "talker_loss" in record:
                summary["first_talker_loss"] = record["talker_loss"]
        summary["last_loss"] = record["loss"]
        if "talker_loss" in record:
            summary["last_talker_loss"] = record["talker_loss"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", step_s=f"{dt:.2f}", tok_s=f"{tokens / dt:.0f}",
                            mfu=f"{record.get('mfu', 0):.1%}")
        if int(m["nonfinite_streak"]) >= cfg.train.max_nonfinite:
            raise TrainingDiverged(
                f"{int(m['nonfinite_streak'])} consecutive steps (up to step {step}) had a non-finite loss or "
                f"gradient (train.max_nonfinite = {cfg.train.max_nonfinite}); their updates were skipped and the "
                f"run stopped. Checkpoints in {ckpts.directory} are intact (latest: step {ckpts.latest_step()}); "
                "lower optim.learning_rate or check the data, then run again to resume.")

    try:
        for step in range(start + 1, cfg.train.steps + 1):
            micro = [next(data) for _ in range(k)]
            _check_loss_tokens(micro, cfg.train.max_loss_tokens, step)
            batch = device_batch(micro, config.thinker, mesh, cfg.data.media_buckets)
            state, step_metrics = trainer.step(state, batch)
            if pending is not None:
                finish(pending)
            pending = (step, step_metrics, None)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                finish(pending)  # a checkpoint only after its step's metrics passed the non-finite check
                pending = None
                ckpts.save(step, state, data, {"step": step}, force=True)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                run_eval(step)
        if pending is not None:
            finish(pending)
        ckpts.wait()
        final_step = int(jax.device_get(state.step))
        run_eval(final_step)
        summary["step"] = final_step
        summary["nonfinite_total"] = int(jax.device_get(state.nonfinite_total))
        if cfg.train.export_on_finish:
            summary["final"] = export_checkpoint(cfg, config, host_params(state.params),
                                                 os.path.join(workdir, "final"), tokenizer_dir)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        ckpts.close()
    if cfg.train.plot:
        summary["plot"] = plot_loss_curve(workdir)
    return summary
