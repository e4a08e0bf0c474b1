"""The abstract program of each job: a jitted function with the real shardings (the rule table's) and its arguments
as ShapeDtypeStructs, so that `.lower(*args).compile()` builds the TPU program without a single weight in memory.

    program = train_program(config, options, mesh, shape, train_settings)
    compiled = program.lower().compile()

Jobs:
  train    the thinker train step of train/step.py (Trainer._train_step): f32 master weights + AdamW state,
           a text batch [k, B/k, L] as train/batches.py stacks it, the state donated.
  prefill  the thinker prefill of generation.py: a left-padded prompt [B, L] into a KV cache of max_len slots,
           the first token picked.
  decode   one cached decode step of generation.py (the on-device loop, run for one step) over a max_len cache
           holding B rows.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from omni_jax.config import OmniConfig, RuntimeOptions
from omni_jax.sharding import batch_sharding, logical_shardings, replicated, rules_context, spec_for

JOBS = ("train", "prefill", "decode")


class JobError(ValueError):
    """Shapes that cannot make the asked program (a one-line message for people)."""


@dataclasses.dataclass(frozen=True)
class JobShape:
    batch: int  # B: global rows (train: all microbatches of one step)
    seq_len: int  # L: train row length / prompt length
    max_len: int  # KV cache slots (prefill, decode)
    grad_accum: int = 1  # k microbatches per train step


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What of a train YAML shapes the step program (train.config sections; defaults = TrainConfig's)."""

    optim: Any = None  # train.config.OptimSection (None: its defaults)
    total_steps: int = 100  # schedule length (no effect on the program's shape)
    max_loss_tokens: int = 0
    loss_chunk: int = 0
    freeze: tuple = ()


@dataclasses.dataclass
class Program:
    job: str
    fn: Any  # jax.jit(...) with in/out shardings
    args: tuple  # ShapeDtypeStructs (shardings attached where the jit has none) and static values
    shapes: dict  # for the report: {"batch": ..., "seq_len": ..., ...}
    mesh: Mesh

    def lower(self):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*self.args)


def runtime_options(dtype: str, param_dtype: str, attention_backend: str, remat_policy: str = "none",
                    scan_layers: bool = True) -> RuntimeOptions:
    """RuntimeOptions of a TPU program: `platform="tpu"` makes every kernel and path choice follow the TPU target
    rather than this (CPU) host (omni_jax/kernels/target.py)."""
    return RuntimeOptions(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend,
                          remat_policy=remat_policy, scan_layers=scan_layers, platform="tpu")


def _check_rows(rows: int, mesh: Mesh, what: str) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise JobError(f"{what} of {rows} rows does not split over data x fsdp = {shards} devices; use a multiple "
                       f"of {shards}")


def _abstract(shape: Sequence[int], dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


# ---------------------------------------------------------------------------------------------------- train
def text_train_batch(mesh: Mesh, shape: JobShape) -> dict:
    """A text-only step batch as train.batches.stack_microbatches + to_global make it, as ShapeDtypeStructs:
    token arrays [k, B/k, L], positions [k, 3, B/k, L], no encoder inputs."""
    from train.batches import TOKEN_KEYS, batch_shardings

    k = shape.grad_accum
    if shape.batch % k:
        raise JobError(f"batch {shape.batch} is not divisible by grad_accum {k}")
    rows = shape.batch // k
    _check_rows(rows, mesh, "a microbatch")
    host = {key: (k, rows, shape.seq_len) for key in TOKEN_KEYS if not key.startswith("talker_")}
    host["positions"] = (k, 3, rows, shape.seq_len)
    host.update(audio=None, image=None, video=None)
    shardings = batch_shardings(host, mesh)
    return {key: None if dims is None else _abstract(dims, jnp.float32 if key == "loss_mask" else jnp.int32,
                                                      shardings[key])
            for key, dims in host.items()}


def train_program(config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape,
                  settings: TrainSettings = TrainSettings()) -> Program:
    """The thinker train step (train/step.py) jitted as Trainer.step jits it: state and batch shardings, the
    state donated, metrics replicated."""
    # Lazy: the train step lives in train/, which omni_jax does not import at module level (as in omni_jax/cli.py).
    from train.config import OptimSection
    from train.step import Trainer, make_optimizer, module_labels

    from omni_jax.models.thinker import Thinker, init_thinker

    batch = text_train_batch(mesh, shape)
    thinker = Thinker(config.thinker, options)
    abstract = {"thinker": nn.meta.unbox(jax.eval_shape(lambda: init_thinker(thinker, jax.random.key(0)))["params"])}
    optimizer = make_optimizer(settings.optim or OptimSection(), settings.total_steps,
                               module_labels(abstract, settings.freeze))
    trainer = Trainer(thinker, optimizer, mesh, max_loss_tokens=settings.max_loss_tokens,
                      loss_chunk=settings.loss_chunk)
    fn = trainer.step_fn(batch)
    shapes = {"batch": shape.batch, "seq_len": shape.seq_len, "grad_accum": shape.grad_accum,
              "microbatch": [shape.grad_accum, shape.batch // shape.grad_accum, shape.seq_len],
              "params": _count(trainer.abstract_state.params)}
    return Program("train", fn, (trainer.abstract_state, batch), shapes, mesh)


def _count(tree) -> int:
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree)))


# ---------------------------------------------------------------------------------------------------- serving
def _thinker_apply(thinker, params, input_ids, positions, segment_ids, cache=None, multimodal=None):
    """The thinker forward of generation (OmniModel._thinker_forward with last_logits_only)."""
    with rules_context():
        return thinker.apply({"params": params}, input_ids, positions, segment_ids, cache, last_logits_only=True,
                             **(multimodal or {}))


def _serving_parts(config: OmniConfig, options: RuntimeOptions, mesh: Mesh):
    """(thinker, abstract params [with shardings], param shardings) of the served thinker."""
    from omni_jax.models.thinker import Thinker, init_thinker

    thinker = Thinker(config.thinker, options)
    boxed = jax.eval_shape(lambda: init_thinker(thinker, jax.random.key(0)))["params"]
    shardings = logical_shardings(boxed, mesh)
    params = jax.tree_util.tree_map(lambda a, s: _abstract(a.shape, a.dtype, s), nn.meta.unbox(boxed), shardings)
    return thinker, params, shardings


def _empty_cache(config: OmniConfig, options: RuntimeOptions, batch: int, max_len: int):
    from omni_jax.models.kv_cache import KVCache

    text = config.thinker.text
    return KVCache.init(text.num_hidden_layers, batch, max_len, text.num_key_value_heads, text.head_dim,
                        jnp.dtype(options.dtype), platform=options.platform)


def _decode_state_shardings(state, mesh: Mesh, batch: int):
    """DecodeState shardings: cache keys/values [L, B, S, K, d] on (layers, batch, length, kv heads) by the rule
    table; other per-row leaves ([B, ...]) on the batch; scalars and the key replicated."""
    kv_axes = ("layers", "activation_batch", "activation_length", "activation_kv_heads", None)

    def one(path, leaf):
        names = [getattr(p, "name", getattr(p, "key", "")) for p in path]
        if names[:1] == ["cache"] and names[-1] in ("k", "v"):
            return NamedSharding(mesh, spec_for(leaf.shape, kv_axes, mesh))
        if leaf.ndim and leaf.shape[0] == batch:
            return batch_sharding(mesh, leaf.ndim, 0)
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, state)


def _generation_settings(config: OmniConfig) -> dict:
    thinker = config.thinker
    eos = thinker.eos_token_id if thinker.eos_token_id is not None else 151645
    pad = thinker.pad_token_id if thinker.pad_token_id is not None else 151643
    # numpy, not jnp: under a mesh of compile-only devices nothing may be placed on a device
    return dict(eos_ids=np.asarray([eos], np.int32), pad_id=int(pad), vocab_size=thinker.text.vocab_size)


def _prefill(config: OmniConfig, options: RuntimeOptions, thinker, mesh: Mesh, params, shape: JobShape):
    """(generation.prefill of a [B, L] text prompt into a max_len cache, its abstract arguments with their
    shardings where known, and the abstract DecodeState it returns)."""
    from omni_jax import generation
    from omni_jax.sampling import SamplingParams

    gen = _generation_settings(config)
    b, length = shape.batch, shape.seq_len

    def prefill(params, input_ids, attention_mask, positions, first_position, cache, key, sampling):
        return generation.prefill(partial(_thinker_apply, thinker), params, input_ids, attention_mask, positions,
                                  first_position, cache, key, sampling, max_new_tokens=shape.max_len - length,
                                  use_penalty=False, keep_hidden=False, **gen)[0]

    rows, positions = batch_sharding(mesh, 2, 0), batch_sharding(mesh, 3, 1)
    args = (params, _abstract((b, length), jnp.int32, rows), _abstract((b, length), jnp.int32, rows),
            _abstract((3, b, length), jnp.int32, positions), _abstract((b,), jnp.int32, batch_sharding(mesh, 1, 0)),
            jax.eval_shape(lambda: _empty_cache(config, options, b, shape.max_len)),
            jax.eval_shape(lambda: jax.random.key(0)), jax.eval_shape(lambda: SamplingParams.make(b)))
    return prefill, args, jax.eval_shape(prefill, *args)


def _check_serving_shape(config: OmniConfig, mesh: Mesh, shape: JobShape) -> None:
    _check_rows(shape.batch, mesh, "a batch")
    if shape.max_len <= shape.seq_len:
        raise JobError(f"--max-len {shape.max_len} must exceed --seq-len {shape.seq_len} (the cache holds the prompt "
                       f"and the generated tokens)")
    limit = config.thinker.text.max_position_embeddings
    if shape.max_len > limit:
        raise JobError(f"--max-len {shape.max_len} exceeds the model's context of {limit} positions")


def prefill_program(config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape) -> Program:
    """generation.prefill of a [B, L] text prompt into a KV cache of max_len slots (the cache donated)."""
    _check_serving_shape(config, mesh, shape)
    thinker, params, param_shardings = _serving_parts(config, options, mesh)
    b, length = shape.batch, shape.seq_len
    prefill, args, state = _prefill(config, options, thinker, mesh, params, shape)
    state_shardings = _decode_state_shardings(state, mesh, b)
    sampling_shardings = jax.tree_util.tree_map(lambda _: batch_sharding(mesh, 1, 0), args[-1])
    fn = jax.jit(prefill, in_shardings=(param_shardings, *(a.sharding for a in args[1:5]), state_shardings.cache,
                                        replicated(mesh), sampling_shardings),
                 out_shardings=state_shardings, donate_argnums=(5,))
    cache = args[5]
    shapes = {"batch": b, "seq_len": length, "max_len": shape.max_len, "params": _count(params),
              "kv_cache": list(cache.k.shape)}
    return Program("prefill", fn, args, shapes, mesh)


def decode_program(config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape) -> Program:
    """One step of generation.decode_steps (the on-device decode loop) with B rows over a max_len cache (the
    decode state donated, as make_generate_fns does)."""
    from omni_jax import generation

    _check_serving_shape(config, mesh, shape)
    thinker, params, param_shardings = _serving_parts(config, options, mesh)
    state = _prefill(config, options, thinker, mesh, params, shape)[2]
    state_shardings = _decode_state_shardings(state, mesh, shape.batch)
    state = jax.tree_util.tree_map(lambda a, s: _abstract(a.shape, a.dtype, s), state, state_shardings)
    gen = _generation_settings(config)

    def decode(params, state):
        return generation.decode_steps(partial(_thinker_apply, thinker), params, state, 1, gen["eos_ids"],
                                       gen["pad_id"])

    fn = jax.jit(decode, in_shardings=(param_shardings, state_shardings), out_shardings=state_shardings,
                 donate_argnums=(1,))
    shapes = {"batch": shape.batch, "seq_len": shape.seq_len, "max_len": shape.max_len, "params": _count(params),
              "kv_cache": list(state.cache.k.shape)}
    return Program("decode", fn, (params, state), shapes, mesh)


BUILDERS: dict[str, Callable[..., Program]] = {"prefill": prefill_program, "decode": decode_program}


def build_program(job: str, config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape,
                  train: Optional[TrainSettings] = None) -> Program:
    """The Program of `job` (one of JOBS) on `mesh`, traced abstractly under the mesh."""
    if job not in JOBS:
        raise JobError(f"unknown job {job!r}; expected one of {', '.join(JOBS)}")
    with jax.set_mesh(mesh):
        if job == "train":
            return train_program(config, options, mesh, shape, train or TrainSettings())
        return BUILDERS[job](config, options, mesh, shape)
