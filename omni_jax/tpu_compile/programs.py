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
  paged-decode   one decode step of the continuous-batching engine (paged_generation.decode_step): B slots over
                 a paged KV cache holding seq_len tokens per slot on average, rows up to max_len; on TPU the
                 attention is jax's ragged paged attention kernel.
  talker-decode  one talker decode step of speech.py over a max_len talker cache holding B rows.
  token2wav      one streamed Token2Wav round of streaming.py for B rows: the DiT ODE over a chunk window, then
                 BigVGAN over a vocoder window.
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
from omni_jax.tpu_compile import roofline
from omni_jax.sharding import batch_sharding, logical_shardings, replicated, rules_context, spec_for

JOBS = ("train", "prefill", "decode", "paged-decode", "talker-decode", "token2wav")


class JobError(ValueError):
    """Shapes that cannot make the asked program (a one-line message for people)."""


@dataclasses.dataclass(frozen=True)
class JobShape:
    batch: int  # B: global rows (train: all microbatches of one step)
    seq_len: int  # L: train row length / prompt length
    max_len: int  # KV cache slots (prefill, decode)
    grad_accum: int = 1  # k microbatches per train step
    page_size: int = 64  # paged-decode: tokens per KV cache page


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What of a train YAML shapes the step program (train.config sections; defaults = TrainConfig's)."""

    optim: Any = None  # train.config.OptimSection (None: its defaults)
    total_steps: int = 100  # schedule length (no effect on the program's shape)
    max_loss_tokens: int = 0
    loss_chunk: int = 0
    freeze: tuple = ()
    media_buckets: Optional[dict] = None  # data.media_buckets: encoder inputs of these sizes in every step


@dataclasses.dataclass
class Program:
    job: str
    fn: Any  # jax.jit(...) with in/out shardings
    args: tuple  # ShapeDtypeStructs (shardings attached where the jit has none) and static values
    shapes: dict  # for the report: {"batch": ..., "seq_len": ..., ...}
    mesh: Mesh
    # for the roofline (tpu_compile/roofline.py); None: not modelled for this job
    model_flops: Optional[float] = None  # the whole step, all chips
    tokens: int = 0  # tokens the step processes (train, prefill) or emits (decode: one per row)
    hbm_extra_bytes: float = 0.0  # per chip, beyond arguments (+ outputs for train): gathered weight reads
    reads_outputs: bool = False  # train: the state is read (arguments) and written (outputs)

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
def train_batch(mesh: Mesh, shape: JobShape, thinker_config, media_buckets: Optional[dict] = None) -> dict:
    """A step batch as train.batches.stack_microbatches + to_global make it, as ShapeDtypeStructs: token arrays
    [k, B/k, L] and positions [k, 3, B/k, L] on the batch axis; with media_buckets ({"audio_chunks": n,
    "image_patches": n, "video_patches": n}, the train YAML's data.media_buckets) also the encoder inputs of
    those buckets, replicated, as every step of such a run gets them."""
    from train.batches import TOKEN_KEYS, batch_shardings, stack_microbatches

    k = shape.grad_accum
    if shape.batch % k:
        raise JobError(f"batch {shape.batch} is not divisible by grad_accum {k}")
    rows = shape.batch // k
    _check_rows(rows, mesh, "a microbatch")
    keys = [key for key in TOKEN_KEYS if not key.startswith("talker_")]
    # one pipeline batch of the right shapes; its token values do not matter (only shapes reach the program)
    micro = {key: np.zeros((rows, shape.seq_len), np.int32) for key in keys}
    micro["positions"] = np.zeros((3, rows, shape.seq_len), np.int32)
    host = stack_microbatches([micro] * k, thinker_config, media_buckets or {})
    shardings = batch_shardings(host, mesh)
    return jax.tree_util.tree_map(lambda a, s: _abstract(np.shape(a), np.asarray(a).dtype, s), host, shardings)


def _media_shapes(batch: dict) -> dict:
    """{"audio_chunks": [k, C, mels, frames], "image_patches": [k, N, dim], ...} of a step batch's encoder inputs."""
    out = {}
    if batch.get("audio") is not None:
        out["audio_chunks"] = list(batch["audio"].chunks.shape)
    for name in ("image", "video"):
        if batch.get(name) is not None:
            out[f"{name}_patches"] = list(batch[name].pixel_values.shape)
    return out


def train_program(config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape,
                  settings: TrainSettings = TrainSettings()) -> Program:
    """The thinker train step (train/step.py) jitted as Trainer.step jits it: state and batch shardings, the
    state donated, metrics replicated."""
    # Lazy: the train step lives in train/, which omni_jax does not import at module level (as in omni_jax/cli.py).
    from train.config import OptimSection
    from train.step import Trainer, make_optimizer, module_labels

    from omni_jax.models.thinker import Thinker, init_thinker

    batch = train_batch(mesh, shape, config.thinker, settings.media_buckets)
    thinker = Thinker(config.thinker, options)
    abstract = {"thinker": nn.meta.unbox(jax.eval_shape(lambda: init_thinker(thinker, jax.random.key(0)))["params"])}
    optimizer = make_optimizer(settings.optim or OptimSection(), settings.total_steps,
                               module_labels(abstract, settings.freeze))
    trainer = Trainer(thinker, optimizer, mesh, max_loss_tokens=settings.max_loss_tokens,
                      loss_chunk=settings.loss_chunk, freeze=settings.freeze)
    fn = trainer.step_fn(batch)
    media = _media_shapes(batch)
    shapes = {"batch": shape.batch, "seq_len": shape.seq_len, "grad_accum": shape.grad_accum,
              "microbatch": [shape.grad_accum, shape.batch // shape.grad_accum, shape.seq_len],
              "params": _count(trainer.abstract_state.params), **media}
    params = trainer.abstract_state.params["thinker"]
    tokens = shape.batch * shape.seq_len
    flops = roofline.decoder_flops(config.thinker.text, tokens, roofline.causal_pairs(shape.batch, shape.seq_len),
                                   forward_only="thinker_lm" in settings.freeze)
    # encoders: per audio chunk its positions after the conv stem (n_window), per vision patch one position
    if "audio_chunks" in media:
        positions = int(np.prod(media["audio_chunks"][:2])) * config.thinker.audio.n_window
        flops += roofline.encoder_flops(_count(params["audio_tower"]), positions, "audio_encoder" in settings.freeze)
    patches = sum(int(np.prod(media[k][:2])) for k in ("image_patches", "video_patches") if k in media)
    if patches:
        flops += roofline.encoder_flops(_count(params["visual"]), patches, "vision_encoder" in settings.freeze)
    passes = 2 if options.remat_policy == "none" else 3  # forward (+ remat recomputation) + backward
    gathered = passes * _count(params) * jnp.dtype(options.dtype).itemsize
    return Program("train", fn, (trainer.abstract_state, batch), shapes, mesh, model_flops=flops, tokens=tokens,
                   hbm_extra_bytes=gathered, reads_outputs=True)


def _count(tree) -> int:
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree)))


# ---------------------------------------------------------------------------------------------------- serving
def _thinker_apply(thinker, params, input_ids, positions, segment_ids, cache=None, multimodal=None):
    """The thinker forward of generation (OmniModel._thinker_forward with last_logits_only)."""
    with rules_context():
        return thinker.apply({"params": params}, input_ids, positions, segment_ids, cache, last_logits_only=True,
                             **(multimodal or {}))


def _placed_params(boxed, mesh: Mesh):
    """(abstract params with their rule-table shardings, the shardings) of a module's boxed abstract params."""
    shardings = logical_shardings(boxed, mesh)
    params = jax.tree_util.tree_map(lambda a, s: _abstract(a.shape, a.dtype, s), nn.meta.unbox(boxed), shardings)
    return params, shardings


def _serving_parts(config: OmniConfig, options: RuntimeOptions, mesh: Mesh):
    """(thinker, abstract params [with shardings], param shardings) of the served thinker."""
    from omni_jax.models.thinker import Thinker, init_thinker

    thinker = Thinker(config.thinker, options)
    return (thinker, *_placed_params(jax.eval_shape(lambda: init_thinker(thinker, jax.random.key(0)))["params"],
                                     mesh))


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
    flops = roofline.decoder_flops(config.thinker.text, b * length, roofline.causal_pairs(b, length),
                                   forward_only=True, head_tokens=b)
    return Program("prefill", fn, args, shapes, mesh, model_flops=flops, tokens=b * length)


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
    # every row attends over the whole cache (the kernel reads all max_len slots)
    flops = roofline.decoder_flops(config.thinker.text, shape.batch, shape.batch * shape.max_len, forward_only=True)
    return Program("decode", fn, (params, state), shapes, mesh, model_flops=flops, tokens=shape.batch)


def paged_decode_program(config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape) -> Program:
    """One step of the continuous-batching engine: B slots, each attending its own pages of a pool sized for
    seq_len tokens per slot on average (rows may reach max_len), pages and the repetition-penalty mask donated.
    Slots and the pool split over the batch devices (each shard its own pages), kv heads over the head axes."""
    from omni_jax.kernels.pallas_attention import shard_axes
    from omni_jax.models.kv_cache import PagedKVCache
    from omni_jax.paged_generation import decode_step
    from omni_jax.sampling import SamplingParams

    options = dataclasses.replace(options, scan_layers=False)  # a page pool per layer: unrolled layers
    _check_rows(shape.batch, mesh, "a slot batch")
    limit = config.thinker.text.max_position_embeddings
    if shape.max_len > limit:
        raise JobError(f"--max-len {shape.max_len} exceeds the model's context of {limit} positions")
    if shape.seq_len > shape.max_len:
        raise JobError(f"--seq-len {shape.seq_len} (tokens per slot on average) exceeds --max-len {shape.max_len}")
    thinker, params, param_shardings = _serving_parts(config, options, mesh)
    text = config.thinker.text
    s, page = shape.batch, shape.page_size
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    pages_per_row = -(-shape.max_len // page)
    pool = -(-(s * -(-shape.seq_len // page) + shards) // shards) * shards  # + a scratch page per shard
    with jax.set_mesh(mesh), rules_context():
        batch_axes, head_axes = shard_axes(mesh.abstract_mesh, pool, text.num_key_value_heads)
    pool_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes, None, head_axes, None))
    stored = jax.eval_shape(lambda: PagedKVCache.init_pages(1, pool, page, text.num_key_value_heads, text.head_dim,
                                                            jnp.dtype(options.dtype), platform=options.platform))[0]
    pages = tuple(_abstract(stored.shape, stored.dtype, pool_sharding) for _ in range(text.num_hidden_layers))
    rows = batch_sharding(mesh, 1, 0)
    table = batch_sharding(mesh, 2, 0)
    sampling = jax.tree_util.tree_map(lambda a: _abstract(a.shape, a.dtype, rows),
                                      jax.eval_shape(lambda: SamplingParams.make(s)))
    args = (params, pages, _abstract((s,), jnp.int32, rows), _abstract((s,), jnp.int32, rows),
            _abstract((s, pages_per_row), jnp.int32, table), _abstract((s,), jnp.int32, rows),
            _abstract((s,), jnp.bool_, rows), sampling, _abstract((s, 2), jnp.uint32, table),
            _abstract((s, text.vocab_size), jnp.bool_, table), _abstract((s,), jnp.int32, rows))

    def step(params, pages, tokens, positions, page_table, lengths, active, sampling, key_data, seen, counts):
        def apply(**kwargs):
            with rules_context():
                return thinker.apply({"params": params}, **kwargs)

        return decode_step(apply, pages, tokens, positions, page_table, lengths, active, sampling, key_data, seen,
                           counts, cache_dtype=jnp.dtype(options.dtype))

    in_shardings = (param_shardings, tuple(a.sharding for a in pages)) + tuple(
        jax.tree_util.tree_map(lambda a: a.sharding, a) for a in args[2:])
    out_shardings = (rows, in_shardings[1], table, table)
    fn = jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(1, 9))
    shapes = {"batch": s, "seq_len": shape.seq_len, "max_len": shape.max_len, "page_size": page,
              "pool_pages": pool, "pages_per_row": pages_per_row, "params": _count(params),
              "kv_pool": [text.num_hidden_layers] + list(stored.shape)}
    # each row attends over its own tokens: seq_len on average
    flops = roofline.decoder_flops(text, s, s * shape.seq_len, forward_only=True)
    return Program("paged-decode", fn, args, shapes, mesh, model_flops=flops, tokens=s)


# ---------------------------------------------------------------------------------------------------- speech
def _talker_parts(config: OmniConfig, options: RuntimeOptions, mesh: Mesh):
    """(talker, abstract params [with shardings], param shardings): the talker placed by the rule table."""
    from omni_jax.models.talker import Talker, init_talker

    if config.talker is None or config.token2wav is None:
        raise JobError("this model config has no talker / token2wav (a thinker-only model)")
    talker = Talker(config.talker, options)
    return (talker, *_placed_params(jax.eval_shape(lambda: init_talker(talker, jax.random.key(0)))["params"],
                                    mesh))


def talker_decode_program(config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape) -> Program:
    """One step of speech.talker_decode (the talker's on-device loop, run for one step) with B rows over a
    max_len talker cache: a talker prompt of seq_len (the thinker prompt + 2) and a reply stream of
    max_len - seq_len thinker-space elements [B, N, E] (the state donated, as make_talker_fns does)."""
    from omni_jax.models.talker import Talker
    from omni_jax.models.kv_cache import KVCache
    from omni_jax.sampling import SamplingParams
    from omni_jax.speech import TalkerJob, make_talker_fns, talker_decode, talker_suppressed_tokens

    _check_rows(shape.batch, mesh, "a batch")
    cfg = config.talker
    if shape.max_len <= shape.seq_len:
        raise JobError(f"--max-len {shape.max_len} must exceed --seq-len {shape.seq_len} (the talker cache holds "
                       f"the talker prompt and the codes)")
    if shape.max_len > cfg.max_position_embeddings:
        raise JobError(f"--max-len {shape.max_len} exceeds the talker's context of {cfg.max_position_embeddings}")
    talker, params, param_shardings = _talker_parts(config, options, mesh)
    b, prompt, codes = shape.batch, shape.seq_len, shape.max_len - shape.seq_len
    width = cfg.embedding_size
    eos = (cfg.tts_codec_pad_token_id, cfg.tts_codec_end_token_id)
    suppress = talker_suppressed_tokens(cfg, config.token2wav.dit.num_embeds, eos)

    def apply(p, embeds, positions, segment_ids, cache):
        with rules_context():
            return talker.apply({"params": p}, embeds, positions, segment_ids, cache, last_logits_only=True)

    def codec_embed(p, ids):
        with rules_context():
            return talker.apply({"params": p}, ids, method=Talker.embed_codec)

    dtype = jnp.dtype(options.dtype)
    job = TalkerJob(prefill=jax.ShapeDtypeStruct((b, prompt, width), dtype),
                    reply=jax.ShapeDtypeStruct((b, codes, width), dtype),
                    positions=jax.ShapeDtypeStruct((3, b, prompt), jnp.int32),
                    segment_ids=jax.ShapeDtypeStruct((b, prompt), jnp.int32),
                    first_position=jax.ShapeDtypeStruct((b,), jnp.int32),
                    seen_ids=jax.ShapeDtypeStruct((b, prompt), jnp.int32))
    cache = jax.eval_shape(lambda: KVCache.init(cfg.num_hidden_layers, b, shape.max_len, cfg.num_key_value_heads,
                                                cfg.head_dim, dtype, platform=options.platform))
    prefill_fn, _ = make_talker_fns(apply, codec_embed, max_new_tokens=codes, eos_ids=eos,
                                    pad_id=cfg.tts_codec_pad_token_id, vocab_size=cfg.vocab_size,
                                    suppress_tokens=suppress, platform=options.platform)
    state = jax.eval_shape(prefill_fn, params, job, cache, jax.eval_shape(lambda: jax.random.key(0)),
                           jax.eval_shape(lambda: SamplingParams.make(b)))
    state_shardings = _decode_state_shardings(state, mesh, b)
    state = jax.tree_util.tree_map(lambda a, s: _abstract(a.shape, a.dtype, s), state, state_shardings)
    reply_sharding = batch_sharding(mesh, 3, 0)
    reply = _abstract((b, codes, width), dtype, reply_sharding)
    eos_ids = np.asarray(eos, np.int32)

    def decode(params, state, reply):
        return talker_decode(apply, codec_embed, params, state, reply, 1, eos_ids, cfg.tts_codec_pad_token_id,
                             suppress, options.platform)

    fn = jax.jit(decode, in_shardings=(param_shardings, state_shardings, reply_sharding),
                 out_shardings=state_shardings, donate_argnums=(1,))
    shapes = {"batch": b, "seq_len": prompt, "max_len": shape.max_len, "params": _count(params),
              "kv_cache": list(state.cache.k.shape), "reply": [b, codes, width]}
    flops = roofline.decoder_flops(cfg, b, b * shape.max_len, forward_only=True) + 2.0 * b * width * cfg.hidden_size
    return Program("talker-decode", fn, (params, state, reply), shapes, mesh, model_flops=flops, tokens=b)


REF_MEL_FRAMES = 300  # token2wav: reference mel frames of the voice (only ECAPA reads them; --seq-len overrides)


def token2wav_program(config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape) -> Program:
    """One streamed Token2Wav round for B rows, as streaming.StreamingToken2Wav runs it: the DiT flow-matching
    ODE (10 steps, classifier-free guidance) over one window of the released chunk layout (144 mel frames: 48
    past, 72 chunk, 24 future), then BigVGAN over a vocoder window (135 mel frames) -> [B, 135 * 240] samples.
    float32, as the reference runs Token2Wav; params replicated, rows over data x fsdp."""
    from omni_jax.models.bigvgan import BigVGAN
    from omni_jax.models.dit import DiT
    from omni_jax.streaming import StreamLayout, window_mel

    _check_rows(shape.batch, mesh, "a batch")
    if config.token2wav is None:
        raise JobError("this model config has no token2wav (a thinker-only model)")
    dit_cfg, vocoder_cfg = config.token2wav.dit, config.token2wav.bigvgan
    layout = StreamLayout.for_config(dit_cfg)
    dit_options = RuntimeOptions(attention_backend=options.attention_backend, platform=options.platform)
    dit, vocoder = DiT(dit_cfg, dit_options), BigVGAN(vocoder_cfg, platform=options.platform)
    b, ref_frames = shape.batch, shape.seq_len
    window = layout.window
    dit_params = nn.meta.unbox(jax.eval_shape(lambda: dit.init(
        jax.random.key(0), jnp.zeros((1, window, dit_cfg.mel_dim)), jnp.zeros((1, window // dit_cfg.repeats), jnp.int32),
        jnp.zeros((1, dit_cfg.enc_emb_dim)), jnp.zeros((1, ref_frames, dit_cfg.mel_dim)), jnp.zeros((1,)))))
    vocoder_params = nn.meta.unbox(jax.eval_shape(lambda: vocoder.init(
        jax.random.key(0), jnp.zeros((1, vocoder_cfg.mel_dim, layout.vocoder_window)))))["params"]
    everywhere = replicated(mesh)
    rows = lambda ndim: batch_sharding(mesh, ndim, 0)  # noqa: E731
    place = lambda tree: jax.tree_util.tree_map(lambda a: _abstract(a.shape, a.dtype, everywhere), tree)  # noqa: E731
    f32 = jnp.float32
    args = (place(dit_params), place(vocoder_params),
            _abstract((b, window // dit_cfg.repeats), jnp.int32, rows(2)),  # codes
            _abstract((b, dit_cfg.enc_emb_dim), f32, rows(2)),  # cond
            _abstract((b, ref_frames, dit_cfg.mel_dim), f32, rows(3)),  # ref_mel
            _abstract((b, window, dit_cfg.mel_dim), f32, rows(3)),  # noise
            _abstract((b, window), jnp.int32, rows(2)),  # frame_mask
            _abstract((b, vocoder_cfg.mel_dim, layout.vocoder_window - layout.chunk), f32, rows(3)))  # mel history

    def chunk_round(dit_params, vocoder_params, codes, cond, ref_mel, noise, frame_mask, history):
        mel = window_mel(dit_cfg, dit_options, dit_params, codes, cond, ref_mel, noise, frame_mask)  # [B, W, mel]
        chunk = jnp.transpose(mel[:, layout.past:layout.past + layout.chunk], (0, 2, 1))  # [B, mel, 72]
        # the vocoder window of a middle chunk: the row's earlier mel frames, then the new chunk ([B, mel, 135])
        return vocoder.apply({"params": vocoder_params}, jnp.concatenate([history, chunk], axis=2))  # [B, samples]

    fn = jax.jit(chunk_round, in_shardings=tuple(jax.tree_util.tree_map(lambda a: a.sharding, a) for a in args),
                 out_shardings=rows(2))
    shapes = {"batch": b, "ref_mel_frames": ref_frames, "dit_window": window, "vocoder_window": layout.vocoder_window,
              "params": _count(dit_params) + _count(vocoder_params)}
    return Program("token2wav", fn, args, shapes, mesh)


BUILDERS: dict[str, Callable[..., Program]] = {"prefill": prefill_program, "decode": decode_program,
                                               "paged-decode": paged_decode_program,
                                               "talker-decode": talker_decode_program, "token2wav": token2wav_program}


def build_program(job: str, config: OmniConfig, options: RuntimeOptions, mesh: Mesh, shape: JobShape,
                  train: Optional[TrainSettings] = None) -> Program:
    """The Program of `job` (one of JOBS) on `mesh`, traced abstractly under the mesh."""
    if job not in JOBS:
        raise JobError(f"unknown job {job!r}; expected one of {', '.join(JOBS)}")
    with jax.set_mesh(mesh):
        if job == "train":
            return train_program(config, options, mesh, shape, train or TrainSettings())
        return BUILDERS[job](config, options, mesh, shape)
