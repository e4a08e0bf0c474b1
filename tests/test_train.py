"""Train step and loop: sharded == single device, accumulation == big batch, packed == unpacked, freezing,
NaN skipping, SIGKILL + resume bit-exact, two processes == one, restore onto another mesh.

Data: the text-only `synthetic_count` source (train/synthetic_data.py, packed rows in the pipeline's batch
format) so the tests stay fast; the multimodal path runs in the demo (configs/train/toy.yaml).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from omni_jax.config import OmniConfig, RuntimeOptions
from omni_jax.models.thinker import Thinker, init_thinker
from omni_jax.sharding import make_mesh
from train import synthetic_data
from train.batches import split_microbatches, stack_microbatches, to_global
from train.config import OptimSection, TrainConfig
from train.step import Trainer, make_optimizer, module_labels, thinker_loss_sum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/train/synthetic_count.yaml")


@pytest.fixture(scope="module")
def model():
    cfg = OmniConfig.from_yaml(os.path.join(REPO, "configs/models/tiny.yaml"))
    thinker = Thinker(cfg.thinker, RuntimeOptions())
    params = {"thinker": nn.meta.unbox(jax.jit(lambda r: init_thinker(thinker, r))(jax.random.key(0)))["params"]}
    params = jax.device_get(params)
    return cfg, thinker, params


def _batch(rows=8, seq_len=64, seed=0):
    return next(synthetic_data.make_train_iterator(seq_len=seq_len, batch_size=rows, seed=seed))


def _trainer(thinker, params, mesh_shape, freeze=(), steps=10, max_loss_tokens=0):
    n = int(np.prod(list(mesh_shape.values())))
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    optimizer = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=0), steps, module_labels(params, freeze))
    return Trainer(thinker, optimizer, mesh, max_loss_tokens=max_loss_tokens, freeze=freeze)


def _max_diff(a, b):
    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(
        np.asarray(x, np.float64) - np.asarray(y, np.float64)))), a, b)))


def _worst_gradient_error(got, ref):
    """max over params of ||got - ref|| / ||ref|| (each param's gradient against its own norm); a param whose
    reference gradient is 0 (modules the batch does not reach) counts as exact only if its gradient is 0 too."""
    worst = 0.0
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        norm, error = np.linalg.norm(r), np.linalg.norm(g - r)
        worst = max(worst, float(error / norm) if norm > 0 else (0.0 if error == 0 else np.inf))
    return worst


# Where a sharded or accumulated step is compared with one device and one batch. f32 compute with `highest`
# matmul precision; sharded matmuls and the accumulation sum in another order (~1e-7 relative per op).
# - Gradients: each param's gradient within 1e-5 of its norm (measured at most 5e-7: tiny.yaml, 8 x 64 tokens,
#   three meshes and 4 microbatches).
# - Params after one plain SGD step (lr = SGD_LR), which does not normalise per element: within 1e-6. Each run
#   rounds p - lr * g itself, one float32 spacing at the largest |p| (the RMSNorm scales start at 1: 1.2e-7),
#   plus lr times the gradients' difference.
# AdamW's first update, lr * g / (|g| + eps), is normalised per element: where |g| ~ eps (lm_head columns of
# tokens that never occur), those 1e-7 differences become differences of order lr, whose size measures the
# CPU's code generation, not this code (1.03e-4 on an Intel Xeon against 4.4e-5 on AMD). The AdamW update
# itself is checked against optax in test_optimizer.py.
GRADIENT_RTOL = 1e-5
SGD_LR = 1e-2
SGD_PARAM_ATOL = 1e-6


def _sgd_trainer(thinker, mesh_shape, talker=None):
    n = int(np.prod(list(mesh_shape.values())))
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    if talker is None:
        return Trainer(thinker, optax.sgd(SGD_LR), mesh)
    return Trainer(thinker, optax.sgd(SGD_LR), mesh, max_loss_tokens=32, talker=talker, talker_loss_weight=0.5)


def _global(batch, cfg, trainer, k=1):
    return to_global(stack_microbatches(split_microbatches(batch, k), cfg.thinker), trainer.mesh)


def _run(trainer, params, batches, cfg, k=1):
    """(params after the first step, losses of every step, final state)."""
    state = trainer.init_state(params)
    losses, first = [], None
    for batch in batches:
        state, m = trainer.step(state, _global(batch, cfg, trainer, k))
        losses.append(float(m["loss"]))
        first = jax.device_get(state.params) if first is None else first
    return first, losses, state


def test_sharded_and_accumulated_steps_equal_single_device(model):
    """8 devices in several mesh shapes, and 4 accumulated microbatches, against one device with one batch, where
    the comparison is well-conditioned (tolerances above GRADIENT_RTOL): the first step's gradients, the losses
    of two plain SGD steps (the second runs on the params of the first), and the params after the first."""
    cfg, thinker, params = model
    batches = [_batch(seed=0), _batch(seed=1)]
    single = _sgd_trainer(thinker, {"fsdp": 1})
    ref_grads = jax.device_get(single.gradients(params, _global(batches[0], cfg, single))[0])
    ref, ref_losses, _ = _run(single, params, batches, cfg)
    assert ref_losses[1] < ref_losses[0]
    for mesh_shape, k in (({"fsdp": 2, "tensor": 4}, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 1),
                          ({"fsdp": 1}, 4)):
        trainer = _sgd_trainer(thinker, mesh_shape)
        grads, loss = trainer.gradients(params, _global(batches[0], cfg, trainer, k))
        assert _worst_gradient_error(jax.device_get(grads), ref_grads) < GRADIENT_RTOL, (mesh_shape, k)
        got, losses, _ = _run(trainer, params, batches, cfg, k=k)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=f"{mesh_shape} k={k}")
        np.testing.assert_allclose(float(loss), ref_losses[0], rtol=2e-6)
        assert _max_diff(got, ref) < SGD_PARAM_ATOL, (mesh_shape, k, _max_diff(got, ref))
    # the fused chunked head loss (train.loss_chunk) on a sharded batch: strided chunks over the batch shards and
    # a kernel gradient per shard (models/linear_cross_entropy.py) give the single-device unfused gradients
    for mesh_shape in ({"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}):
        n = int(np.prod(list(mesh_shape.values())))
        trainer = Trainer(thinker, optax.sgd(SGD_LR), make_mesh(mesh_shape, devices=jax.devices()[:n]),
                          loss_chunk=64)
        grads, loss = trainer.gradients(params, _global(batches[0], cfg, trainer))
        assert _worst_gradient_error(jax.device_get(grads), ref_grads) < GRADIENT_RTOL, mesh_shape
        np.testing.assert_allclose(float(loss), ref_losses[0], rtol=2e-6)


def test_loss_at_positions_and_packing(model):
    """(a) A packed row gives the same loss sum as its samples each in their own row; (b) the lm_head at the
    loss positions only (max_loss_tokens) gives the loss of the full-logits path; (c) so does the fused chunked
    head (loss_chunk)."""
    cfg, thinker, params = model
    row = synthetic_data.make_row(3, seed=0, seq_len=64)
    seg = row["segment_ids"]
    n_seg = int(seg.max())
    assert n_seg >= 3
    rows = []
    for s in range(1, n_seg + 1):
        at = np.nonzero(seg == s)[0]
        one = {k: np.zeros_like(v) for k, v in row.items()}
        one["input_ids"][:] = synthetic_data.PAD_ID
        n = len(at)
        for key in ("input_ids", "targets", "loss_mask"):
            one[key][:n] = row[key][at]
        one["segment_ids"][:n] = 1
        one["positions"][:, :n] = row["positions"][:, at]
        rows.append(one)
    unpacked = {k: np.stack([r[k] for r in rows], axis=-2 if k == "positions" else 0) for k in rows[0]}
    packed = {k: v[None] if k != "positions" else v[:, None] for k, v in row.items()}

    loss = jax.jit(lambda p, m, cap: thinker_loss_sum(thinker, p, m, cap), static_argnums=2)
    packed_sum, packed_n = loss(params, packed, 0)
    unpacked_sum, unpacked_n = loss(params, unpacked, 0)
    assert float(packed_n) == float(unpacked_n) > 0
    # same math, different row layout: f32 sums over the vocab per token, ~1e-7 relative
    np.testing.assert_allclose(float(packed_sum), float(unpacked_sum), rtol=1e-6)
    cap_sum, cap_n = loss(params, packed, 64)
    assert float(cap_n) == float(packed_n)
    np.testing.assert_allclose(float(cap_sum), float(packed_sum), rtol=1e-6)

    # (c) the fused chunked head (train.loss_chunk; chunk 24 does not divide the 64 tokens) gives the same loss
    # and gradients, with and without the cap; 1e-5: the same float32 sums accumulated per chunk
    chunked = jax.jit(jax.value_and_grad(lambda p, m, cap, chunk: thinker_loss_sum(thinker, p, m, cap, chunk)[0]),
                      static_argnums=(2, 3))
    for cap in (0, 64):
        (ref_loss, ref_grads), (got_loss, got_grads) = chunked(params, packed, cap, 0), chunked(params, packed, cap, 24)
        np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(ref_grads), jax.tree_util.tree_leaves(got_grads)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_freezing_and_nonfinite_skip(model):
    """Frozen modules stay bit-identical (no update, no weight decay); a NaN loss skips the whole update."""
    cfg, thinker, params = model
    trainer = _trainer(thinker, params, {"fsdp": 2}, freeze=("audio_encoder", "vision_encoder"))
    state = trainer.init_state(params)
    good = _batch()
    bad = dict(good, loss_mask=np.where(good["loss_mask"] > 0, np.nan, 0).astype(np.float32))
    before = jax.device_get(state.params)
    state, m = trainer.step(state, to_global(stack_microbatches([bad], cfg.thinker), trainer.mesh))
    assert not bool(m["finite"]) and int(state.nonfinite_streak) == 1 and int(state.nonfinite_total) == 1
    after_bad = jax.device_get(state.params)
    assert _max_diff(after_bad, before) == 0.0  # nothing moved
    state, m = trainer.step(state, to_global(stack_microbatches([good], cfg.thinker), trainer.mesh))
    assert bool(m["finite"]) and int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 1
    after = jax.device_get(state.params)["thinker"]
    for frozen in ("audio_tower", "visual"):
        assert _max_diff(after[frozen], before["thinker"][frozen]) == 0.0, frozen
    assert _max_diff(after["decoder"], before["thinker"]["decoder"]) > 0
    # freezing the LM instead: the LM is bit-identical, and the encoders move (weight decay)
    trainer = _trainer(thinker, params, {"fsdp": 1}, freeze=("thinker_lm",))
    p, _, _ = _run(trainer, params, [good], cfg)
    for name in ("embed_tokens", "decoder", "lm_head"):
        assert _max_diff(p["thinker"][name], params["thinker"][name]) == 0.0, name
    assert _max_diff(p["thinker"]["audio_tower"], params["thinker"]["audio_tower"]) > 0


def test_frozen_encoders_are_off_the_gradient_path(model, tmp_path):
    """freeze=(encoders): on a batch with an image, audio and a video (toy rows), the encoders get exactly zero
    gradient, the LM the same gradient as without freezing, and the compiled gradient program does less work
    (no backward pass through the encoders)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import multiprocess_media_worker as media_rows

    from omni_jax.processing.processor import Processor
    from omni_jax.processing.tokenizer import write_qwen_tokenizer

    cfg, thinker, params = model
    processor = Processor.from_pretrained(write_qwen_tokenizer(str(tmp_path / "tok")))
    host = media_rows.pipeline_batch(processor, [0, 1, 2, 3])
    assert all(host.get(k) is not None for k in ("input_features", "pixel_values", "pixel_values_videos"))
    mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    batch = to_global(stack_microbatches([host], cfg.thinker, media_rows.BUCKETS), mesh)
    encoders = ("audio_tower", "visual")
    trainers = {freeze: Trainer(thinker, optax.sgd(SGD_LR), mesh, freeze=freeze)
                for freeze in ((), ("audio_encoder", "vision_encoder"))}
    (free, free_loss), (frozen, frozen_loss) = (jax.device_get(t.gradients(params, batch)) for t in trainers.values())
    for name in encoders:
        assert _max_diff(free["thinker"][name], jax.tree_util.tree_map(np.zeros_like, free["thinker"][name])) > 0
        assert all(not np.any(g) for g in jax.tree_util.tree_leaves(frozen["thinker"][name])), name
    lm = lambda g: {k: v for k, v in g["thinker"].items() if k not in encoders}  # noqa: E731
    assert float(frozen_loss) == float(free_loss)
    assert _worst_gradient_error(lm(frozen), lm(free)) <= GRADIENT_RTOL

    def flops(trainer):
        fn = trainer._evals[("gradients", jax.tree_util.tree_structure(batch))]
        with jax.set_mesh(mesh):
            return fn.lower(params, batch).compile().cost_analysis()["flops"]

    assert flops(trainers[("audio_encoder", "vision_encoder")]) < flops(trainers[()])


def test_nonfinite_skip_with_any_optax_optimizer(model):
    """A plain optax transformation (not make_optimizer's) also keeps params and its whole state on a NaN step."""
    import optax

    cfg, thinker, params = model
    trainer = Trainer(thinker, optax.adamw(1e-2), make_mesh({"fsdp": 1}, devices=jax.devices()[:1]))
    state = trainer.init_state(params)
    good = _batch()
    bad = dict(good, loss_mask=np.where(good["loss_mask"] > 0, np.nan, 0).astype(np.float32))
    state, m = trainer.step(state, to_global(stack_microbatches([good], cfg.thinker), trainer.mesh))
    before = jax.device_get((state.params, state.opt_state))
    state, m = trainer.step(state, to_global(stack_microbatches([bad], cfg.thinker), trainer.mesh))
    assert not bool(m["finite"]) and int(state.nonfinite_total) == 1
    assert _max_diff(jax.device_get((state.params, state.opt_state)), before) == 0.0


# ================================================================================================ loop
_LOOP_ARGS = ["train.steps=8", "train.checkpoint_every=3", "train.eval_every=0", "eval.num_batches=0",
              "train.progress=false", "train.tensorboard=false", "train.plot=false",
              "train.export_on_finish=false", "data.batch_size=4", "data.seq_len=32"]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "train.cli", "--config", CONFIG, "--workdir", str(workdir), *_LOOP_ARGS, *extra]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _final_params(workdir, trainer, step=8):
    """Params of checkpoint `step`, restored onto `trainer`'s mesh."""
    from train.checkpointing import Checkpoints

    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), 1, 10)
    try:
        state = ckpts.restore_state(step, trainer.abstract_state)
    finally:
        ckpts.close()
    assert int(state.step) == step
    return jax.device_get(state.params)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_kill_resume_is_bit_exact_and_two_processes_match(tmp_path, model):
    """`python -m train.cli` runs: (A) uninterrupted on 2 devices; (B) the same, SIGKILLed right after its
    first checkpoint and started again (resumes, same data order); (C) two processes of one device each
    (jax.distributed, gloo CPU collectives), each feeding half of every batch. B ends bit-identical to A
    (params and loss curve); C matches A up to cross-process reduction order."""
    base = ["mesh.fsdp=2"]
    a = subprocess.Popen(_train_cmd(tmp_path / "a", *base), env=_env(2), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _free_port()
    c = [subprocess.Popen(_train_cmd(tmp_path / "c", *base), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=_env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                                   JAX_PROCESS_ID=i, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
         for i in range(2)]
    # B: kill as soon as checkpoint 3 is committed (Orbax renames the finished directory into place)
    b = subprocess.Popen(_train_cmd(tmp_path / "b", *base), env=_env(2), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = tmp_path / "b" / "checkpoints" / "3"
    deadline = time.time() + 600
    while not ckpt.exists() and b.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    b.send_signal(signal.SIGKILL)
    b.wait()
    killed_at = sorted(int(p) for p in os.listdir(tmp_path / "b" / "checkpoints") if p.isdigit())
    assert killed_at and killed_at[-1] < 8, f"run B was not killed mid-way (checkpoints {killed_at})"
    resumed = subprocess.run(_train_cmd(tmp_path / "b", *base), env=_env(2), cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["resumed_from"] == killed_at[-1]
    for p in [a] + c:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-4000:]

    losses_a = _losses(tmp_path / "a")
    assert [s for s, _ in losses_a] == list(range(1, 9))
    assert _losses(tmp_path / "b") == losses_a  # bit-exact loss curve, data order included
    cfg, thinker, params = model
    single = _trainer(thinker, params, {"fsdp": 1}, steps=8)
    params_a = _final_params(tmp_path / "a", single)
    assert _max_diff(_final_params(tmp_path / "b", single), params_a) == 0.0
    # two processes: same global batches; cross-process all-reduces sum in another order (~1e-7 relative)
    losses_c = _losses(tmp_path / "c")
    np.testing.assert_allclose([v for _, v in losses_c], [v for _, v in losses_a], rtol=1e-5)
    assert _max_diff(_final_params(tmp_path / "c", single), params_a) < 1e-4

    # restore A's last checkpoint onto another mesh shape (tensor-parallel on 8 devices): same values
    from train.checkpointing import Checkpoints

    trainer = _trainer(thinker, params, {"fsdp": 2, "tensor": 4}, steps=8)
    ckpts = Checkpoints(os.path.join(tmp_path / "a", "checkpoints"), 1, 10)
    try:
        state = ckpts.restore_state(8, trainer.abstract_state)
    finally:
        ckpts.close()
    specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.params)}
    assert any("tensor" in s for s in specs)
    assert _max_diff(jax.device_get(state.params), params_a) == 0.0
    assert int(state.step) == 8


def test_nonfinite_run_stops_with_checkpoints_intact(tmp_path):
    """K consecutive NaN steps stop the loop with a clear error; the checkpoints before them stay usable."""
    from train.loop import TrainingDiverged, train

    cfg = TrainConfig.from_yaml(CONFIG, _LOOP_ARGS + ["mesh.fsdp=4", "mesh.tensor=2", "train.max_nonfinite=2",
                                                      "data.nan_from_batch=4"])
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        train(cfg, str(tmp_path))
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [3]
    losses = _losses(tmp_path)
    assert all(np.isfinite(v) for s, v in losses if s <= 4) and not np.isfinite(losses[-1][1])


# ================================================================================================ talker loss
def _talker_samples(seed=0):
    """Text-only samples shaped as sample.process_record makes them: prompt, a reply of n tokens ending with
    <|im_end|>, a trailing newline, codec targets; reply/codec lengths chosen so that the reply stream R
    covers real states, tts_eos and tts_pad (m > n - 1) and real states only (m < n - 2), and one sample has
    no codec (no talker tokens)."""
    from omni_jax.processing.tokenizer import IM_END_ID

    rng = np.random.default_rng(seed)
    out = []
    for i, (P, n, m) in enumerate([(7, 2, 12), (11, 4, 6), (5, 8, 3), (9, 3, 0), (6, 3, 9)]):
        ids = np.concatenate([rng.integers(100, 5000, P), rng.integers(100, 5000, n - 1), [IM_END_ID, 198]])
        mask = np.zeros(len(ids), bool)
        mask[P:P + n] = True
        out.append({"id": f"t{i}", "input_ids": ids.astype(np.int32), "assistant_mask": mask,
                    "positions": np.broadcast_to(np.arange(len(ids)), (3, len(ids))).astype(np.int32).copy(),
                    "codec": rng.integers(0, 8192, m).astype(np.int32), "audio_features": []})
    return out


@pytest.fixture(scope="module")
def talker_model(model):
    from omni_jax.init_model import DEMO_VOICES
    from omni_jax.data.talker_view import TalkerLayout
    from omni_jax.models.talker import Talker, init_talker

    cfg, thinker, params = model
    talker = Talker(cfg.talker, RuntimeOptions())
    talker_params = nn.meta.unbox(jax.jit(lambda r: init_talker(talker, r))(jax.random.key(1)))["params"]
    layout = TalkerLayout.from_config(cfg.talker, seq_len=96, speaker_bos=DEMO_VOICES["Chelsie"])
    return cfg, thinker, talker, {**params, "talker": jax.device_get(talker_params)}, layout


def _reference_talker_loss(cfg, thinker, talker, params, sample, layout):
    """Talker loss sum of one sample along the generation code path: thinker forward on the sample alone,
    speech.build_talker_inputs (prefill + reply stream), the codec targets fed back as talker_decode does
    (codec_embed(c_k) + reply[min(k-1, N-1)]), positions by rope_index(config=talker) as OmniModel._talk."""
    import jax.numpy as jnp

    from omni_jax.data.talker_view import reply_span
    from omni_jax.models.talker import Talker
    from omni_jax.processing.tmrope import rope_index
    from omni_jax.processing.tokenizer import ENDOFTEXT_ID, IM_END_ID
    from omni_jax.speech import build_talker_inputs
    from train.step import token_losses

    ids = sample["input_ids"][None]
    out = thinker.apply({"params": params["thinker"]}, ids, sample["positions"][:, None], np.ones_like(ids))
    P, n = reply_span(sample)
    codes = np.asarray(sample["codec"])
    m = len(codes)
    embed = lambda x: thinker.apply({"params": params["thinker"]}, x, method=Thinker.embed)  # noqa: E731
    codec_embed = lambda x: talker.apply({"params": params["talker"]}, x, method=Talker.embed_codec)  # noqa: E731
    t = cfg.talker
    prefill, reply = build_talker_inputs(
        embed, codec_embed, ids[:, :P], out.inputs_embeds[:, :P], out.hidden_states[:, :P], ids[:, P:P + n],
        out.hidden_states[:, P:P + n], n, jnp.array([layout.speaker_bos]),
        placeholder_ids=(t.audio_token_index, t.image_token_index, t.video_token_index),
        thinker_eos_ids=(IM_END_ID, ENDOFTEXT_ID), tts_eos=t.tts_text_end_token_id, tts_pad=t.tts_text_pad_token_id,
        codec_pad=t.tts_codec_pad_token_id, codec_bos=t.tts_codec_start_token_id)
    steps = codec_embed(codes[None]) + reply[:, np.minimum(np.arange(m), n - 1)]  # [1, m, E]
    inputs = jnp.concatenate([prefill, steps], axis=1)  # [1, P+2+m, E]
    text_ids = np.concatenate([ids[:, :P], [[layout.speaker_bos]], ids[:, P:P + 1]], axis=1)
    positions, deltas = rope_index(text_ids, None, config=t)
    first = P + 2 + int(deltas[0])
    positions = np.concatenate([positions, np.broadcast_to(first + np.arange(m), (3, 1, m))], axis=2)
    logits = talker.apply({"params": params["talker"]}, inputs, positions, np.ones(inputs.shape[:2], np.int32)).logits
    targets = np.append(codes, t.tts_codec_end_token_id)[None]
    return float(token_losses(logits[:, P + 1:], targets, np.ones_like(targets, np.float32)).sum()), m + 1


def test_talker_loss_matches_the_generation_layout_packed_and_unpacked(talker_model):
    """(a) The step's talker loss on a packed batch (talker_view.collate_talker + train.step gathers) equals the
    sum over its samples of the teacher-forced loss built by the generation code (speech.build_talker_inputs,
    rope_index over [prompt, speaker bos, y_1], +1 per codec), so training and generation cannot drift apart;
    (b) packed rows equal one sample per row. float32 throughout; the packed thinker attends over a longer
    masked row and sums in another order (~1e-7 relative per op): rtol 1e-5 on sums of ~40 token losses."""
    from omni_jax.data.packing import collate
    from train.step import losses_with_talker

    cfg, thinker, talker, params, layout = talker_model
    samples = _talker_samples()
    fn = jax.jit(lambda p, b: losses_with_talker(thinker, talker, p, b))
    ref_sum, ref_tokens = 0.0, 0
    for s in samples:
        if len(s["codec"]):
            loss, count = _reference_talker_loss(cfg, thinker, talker, params, s, layout)
            ref_sum, ref_tokens = ref_sum + loss, ref_tokens + count
    packed = collate([samples[:3], samples[3:]], seq_len=64, talker=layout)
    unpacked = collate([[s] for s in samples], seq_len=64, talker=layout)
    assert packed["talker_segment_ids"][1].max() == 2  # row 1: sample 3 (no codec) is segment 1, then 4
    for batch in (packed, unpacked):
        _, _, talker_sum, talker_tokens = fn(params, {k: v for k, v in batch.items() if k != "num_samples"})
        assert float(talker_tokens) == ref_tokens == sum(len(s["codec"]) + 1 for s in samples if len(s["codec"]))
        np.testing.assert_allclose(float(talker_sum), ref_sum, rtol=1e-5)
    with pytest.raises(ValueError, match="row 0 .*talker seq_len 40"):
        collate([samples[:3]], seq_len=64, talker=type(layout)(**{**layout.__dict__, "seq_len": 40}))


def _talker_trainer(thinker, talker, params, freeze=(), lr=1e-2, mesh_shape=None):
    mesh_shape = mesh_shape or {"fsdp": 2}
    n = int(np.prod(list(mesh_shape.values())))
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    optimizer = make_optimizer(OptimSection(learning_rate=lr, warmup_steps=0), 10, module_labels(params, freeze))
    return Trainer(thinker, optimizer, mesh, max_loss_tokens=32, talker=talker, talker_loss_weight=0.5)


def test_talker_accumulation_freezing_and_checkpoint_resume(talker_model, tmp_path):
    """(c) 2 accumulated microbatches equal the big batch with the talker loss (losses; gradients, and params
    after a plain SGD step, with the tolerances of test_sharded_and_accumulated_steps_equal_single_device);
    (d) freezing "talker" keeps its params bit-identical while the thinker moves; (e) a checkpoint of the
    state with the talker restores bit-exact and continues to the same params as an uninterrupted run."""
    from omni_jax.data.packing import collate
    from train.checkpointing import Checkpoints

    cfg, thinker, talker, params, layout = talker_model
    samples = _talker_samples()
    batch = collate([samples[:2], samples[2:3], samples[3:4], samples[4:]], seq_len=48, talker=layout)
    assert float(batch["talker_loss_mask"][2].sum()) == 0  # row 2 has no codec sample: empty view

    def run(trainer, state, k=1):
        state, m = trainer.step(state, to_global(stack_microbatches(split_microbatches(batch, k), cfg.thinker),
                                                 trainer.mesh))
        return state, {key: float(m[key]) for key in ("loss", "thinker_loss", "talker_loss")}

    trainer = _talker_trainer(thinker, talker, params)
    state, ref = run(trainer, trainer.init_state(params))
    one = jax.device_get(state.params)
    ckpts = Checkpoints(str(tmp_path / "ckpt"), 1, 2, async_save=False)  # (e) saved as the loop does
    try:
        ckpts.save(1, state, synthetic_data.make_train_iterator(seq_len=16, batch_size=1, seed=0), {"step": 1})
        restored = ckpts.restore_state(1, trainer.abstract_state)
    finally:
        ckpts.close()
    assert _max_diff(jax.device_get(restored.params), one) == 0.0
    state, second = run(trainer, state)
    resumed, second_resumed = run(trainer, restored)
    assert second_resumed == second and _max_diff(jax.device_get(resumed.params), jax.device_get(state.params)) == 0
    assert ref["talker_loss"] > 0 and second["talker_loss"] < ref["talker_loss"]
    np.testing.assert_allclose(ref["loss"], ref["thinker_loss"] + 0.5 * ref["talker_loss"], rtol=1e-6)
    assert _max_diff(one["talker"], params["talker"]) > 0  # the talker trains

    _, acc = run(trainer, trainer.init_state(params), k=2)  # (c)
    np.testing.assert_allclose([acc[k] for k in sorted(acc)], [ref[k] for k in sorted(ref)], rtol=2e-6)
    sgd = _sgd_trainer(thinker, {"fsdp": 2}, talker=talker)
    big, accumulated = (to_global(stack_microbatches(split_microbatches(batch, k), cfg.thinker), sgd.mesh)
                        for k in (1, 2))
    ref_grads, acc_grads = (jax.device_get(sgd.gradients(params, b)[0]) for b in (big, accumulated))
    assert _worst_gradient_error(acc_grads, ref_grads) < GRADIENT_RTOL
    assert _max_diff(ref_grads["talker"], jax.tree_util.tree_map(np.zeros_like, ref_grads["talker"])) > 0
    one_sgd, acc_sgd = (jax.device_get(sgd.step(sgd.init_state(params), b)[0].params) for b in (big, accumulated))
    assert _max_diff(acc_sgd, one_sgd) < SGD_PARAM_ATOL

    frozen_trainer = _talker_trainer(thinker, talker, params, freeze=("talker",))  # (d)
    frozen_state, _ = run(frozen_trainer, frozen_trainer.init_state(params))
    frozen = jax.device_get(frozen_state.params)
    assert _max_diff(frozen["talker"], params["talker"]) == 0.0
    assert _max_diff(frozen["thinker"]["decoder"], params["thinker"]["decoder"]) > 0
