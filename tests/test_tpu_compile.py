"""`omni-jax compile`: ahead-of-time TPU compiles on this CPU host (libtpu's compile-only topologies).

Tiny model, 2x2 slices. Checks that the real sharded programs compile for TPU, that the report's numbers are the
compiler's and make sense (arguments = the sharded train state), that Pallas attention becomes Mosaic kernels
with no CPU custom calls left, and that people get one-line errors and the documented exit codes.
"""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'omni-jax[test]'): no TPU compiler")

import jax  # noqa: E402

from omni_jax import cli  # noqa: E402
from omni_jax.tpu_compile import hlo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "models", "tiny.yaml")
CPU_KERNELS = ("omni_jax_cache_scores", "omni_jax_cache_mix", "omni_jax_small_batch_matmul")  # omni_jax/kernels


def compile_json(tmp_path, capsys, *flags):
    """Run `omni-jax compile` in this process; (exit code, JSON report or None, stdout, stderr)."""
    out = tmp_path / "report.json"
    code = cli.main(["compile", "--model-config", TINY, "--json", str(out), *flags])
    captured = capsys.readouterr()
    report = json.loads(out.read_text()) if out.exists() else None
    return code, report, captured.out, captured.err


def check_sane(report, job, topology, mesh):
    assert report["job"] == job and report["topology"] == topology and report["chips"] == 4
    assert report["mesh"] == mesh
    assert report["fits"] is True
    mem = report["per_device_bytes"]
    assert set(mem) == {"arguments", "outputs", "temporaries", "aliased", "total"}
    assert mem["total"] == mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
    assert 0 < mem["total"] < report["hbm_bytes"]
    assert report["hbm_bytes"] == {"v5e:2x2": 16, "v6e:2x2": 32}[topology] * 1024 ** 3
    assert report["compile_s"] > 0
    assert set(report["collectives"]) == set(hlo.COLLECTIVES)
    assert not set(report["custom_calls"]) & set(CPU_KERNELS), report["custom_calls"]


# ------------------------------------------------------------------------------------------ parsing (no compile)
def test_hlo_shapes_and_collectives_are_parsed():
    text = """
  %all-gather.1 = bf16[1,64,2,16]{3,2,0,1:T(2,128)(2,1)} all-gather(%p), channel_id=1, dimensions={1}
  %ars = (f32[8]{0}, f32[32]{0}) all-reduce-start(%a), channel_id=2
  %ard = f32[32]{0} all-reduce-done(%ars)
  ROOT %rs = f32[4,4]{1,0} reduce-scatter(%x), dimensions={0}
  %cc = f32[2] custom-call(%y), custom_call_target="tpu_custom_call"
}

%all-reduce-scatter.3 (input.3: f32[64,128]) -> f32[32,128] {
  %input.3 = f32[64,128]{1,0:T(8,128)S(1)} parameter(0)
  %all-reduce.78 = f32[64,128]{1,0:T(8,128)} all-reduce(%input.3), channel_id=141, replica_groups={{0,2},{1,3}}
  ROOT %dynamic-slice.211 = f32[32,128]{1,0:T(8,128)S(1)} dynamic-slice(%all-reduce.78, %m, %c)
}
"""
    assert hlo.shape_bytes("(f32[8]{0}, bf16[2,3]{1,0})") == 8 * 4 + 6 * 2
    assert hlo.shape_bytes("pred[10]") == 10
    got = hlo.collectives(text)
    assert got["all-gather"] == {"count": 1, "bytes": 64 * 2 * 16 * 2}
    assert got["all-reduce"] == {"count": 1, "bytes": 32 * 4}  # the async pair counts once, by its result
    # one written as such, one as the TPU compiler's fused all-reduce + slice (counted by its result)
    assert got["reduce-scatter"] == {"count": 2, "bytes": 64 + 32 * 128 * 4}
    assert got["all-to-all"] == {"count": 0, "bytes": 0}
    assert hlo.mosaic_kernels(text) == 1


def test_loop_bodies_count_once_per_iteration():
    """collective_traffic: a collective in a while body whose condition is `i < 5` runs 5 times; replica groups in
    the mesh form give the group size; the bytes each chip receives follow the ring formulas."""
    text = """
%body.1 (p: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %ag = bf16[8,64]{1,0} all-gather(%x), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
  %ar = f32[16]{0} all-reduce(%y), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}

%cond.2 (p: (s32[], bf16[8,64])) -> pred[] {
  %constant.3 = s32[]{:T(128)} constant(5)
  %gte = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%gte, %constant.3), direction=LT
}

ENTRY %main.3 (a: f32[4]) -> f32[4] {
  %w = (s32[], bf16[8,64]) while(%t), condition=%cond.2, body=%body.1
  ROOT %rs = f32[4]{0} reduce-scatter(%z), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}
}
"""
    assert hlo.execution_counts(text)["body.1"] == 5
    got = hlo.collective_traffic(text, num_devices=8)
    gather = 8 * 64 * 2
    assert got["all-gather"] == {"executions": 5, "bytes": 5 * gather, "received_bytes": 5 * gather * 3 / 4}
    assert got["all-reduce"] == {"executions": 5, "bytes": 5 * 64, "received_bytes": 5 * 2 * 64 * 1 / 2}
    assert got["reduce-scatter"] == {"executions": 1, "bytes": 16, "received_bytes": 16 * 7}
    assert hlo.collectives(text)["all-gather"]["count"] == 1  # the instruction map counts it once


def test_model_flops_are_six_per_weight_per_token():
    """roofline.decoder_flops from the config's dims: forward + backward of a token is 6 FLOPs per matmul weight
    of the real 7B thinker LM (its decoder layers and lm_head, counted from the model's own params; norms and
    biases are the difference, < 0.1%), plus attention."""
    import flax.linen as nn
    import numpy as np

    from omni_jax.config import OmniConfig, RuntimeOptions
    from omni_jax.models.thinker import Thinker, init_thinker
    from omni_jax.tpu_compile import roofline

    config = OmniConfig.from_yaml(os.path.join(ROOT, "configs", "models", "qwen2_5_omni_7b.yaml"))
    params = nn.meta.unbox(jax.eval_shape(lambda: init_thinker(Thinker(config.thinker, RuntimeOptions()),
                                                               jax.random.key(0)))["params"])
    lm = sum(int(np.prod(x.shape)) for name in ("decoder", "lm_head")
             for x in jax.tree_util.tree_leaves(params[name]))
    text = config.thinker.text
    no_attention = roofline.decoder_flops(text, 1000, 0, forward_only=False)
    assert abs(no_attention / (6 * lm * 1000) - 1) < 1e-3, (no_attention, 6 * lm * 1000)
    attention = roofline.decoder_flops(text, 1000, roofline.causal_pairs(1, 1000), False) - no_attention
    assert attention == 12 * 1000 * 1000 / 2 * text.num_attention_heads * text.head_dim * text.num_hidden_layers


# ------------------------------------------------------------------------------------------ bad requests: exit 2
def test_unknown_topology_is_a_one_line_error(tmp_path, capsys):
    code, report, out, err = compile_json(tmp_path, capsys, "--topology", "v9x:2x2", "--job", "train")
    assert code == 2 and report is None
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: unknown TPU topology 'v9x:2x2'") and "v6e:4x4" in line, err
    assert "Traceback" not in err


def test_mesh_that_does_not_match_the_chips_is_a_one_line_error(tmp_path, capsys):
    code, _, _, err = compile_json(tmp_path, capsys, "--topology", "v5e:2x2", "--job", "train",
                                   "--mesh", "fsdp=2,tensor=4")
    assert code == 2
    assert "error: mesh data=1xfsdp=2xtensor=4 has 8 devices but the topology has 4" in err, err
    code, _, _, err = compile_json(tmp_path, capsys, "--topology", "v5e:2x2", "--job", "train",
                                   "--mesh", "fsdp=3,tensor=-1")
    assert code == 2 and "does not divide the 4 chips" in err, err
    code, _, _, err = compile_json(tmp_path, capsys, "--topology", "v5e:2x2", "--job", "train",
                                   "--mesh", "fsdp=4", "--batch", "6")
    assert code == 2 and "6 rows does not split over data x fsdp = 4" in err, err
    code, _, _, err = compile_json(tmp_path, capsys, "--topology", "v5e:2x2", "--job", "train",
                                   "--media-buckets", "video_frames=4")
    assert code == 2 and "--media-buckets 'video_frames=4'" in err, err


def test_serving_presets_are_read_and_checked(tmp_path, capsys):
    """configs/serve/*.yaml: every job has shapes; a job the preset lacks, or a train job, is a one-line error."""
    from serve.preset import SERVING_JOBS, ServePreset

    for name in ("qwen2_5_omni_7b_v5e8.yaml", "qwen2_5_omni_7b_v6e8.yaml"):
        preset = ServePreset.from_yaml(os.path.join(ROOT, "configs", "serve", name))
        assert set(preset.jobs) == set(SERVING_JOBS) and preset.dtype == "bfloat16"
        assert math.prod(preset.mesh.values()) == 8
    partial = tmp_path / "preset.yaml"
    partial.write_text(f"model: {{config: {TINY}}}\nmesh: {{fsdp: 4}}\njobs:\n  decode: {{batch: 4, seq_len: 8, "
                       f"max_len: 16}}\n")
    code = cli.main(["compile", "--serve-config", str(partial), "--topology", "v5e:2x2", "--job", "prefill"])
    assert code == 2 and "has no shapes for job 'prefill' (it has: decode)" in capsys.readouterr().err
    code = cli.main(["compile", "--serve-config", str(partial), "--topology", "v5e:2x2", "--job", "train"])
    assert code == 2 and "--serve-config describes serving programs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ programs that fit
def test_train_step_compiles_sharded_with_mosaic_attention(tmp_path, capsys):
    """The train step on v5e:2x2 (fsdp=2, tensor=2), Pallas attention (the TPU default): fits; the forward and
    both backward attention kernels are Mosaic custom calls; FSDP/tensor sharding needs collectives."""
    code, report, out, _ = compile_json(tmp_path, capsys, "--topology", "v5e:2x2", "--job", "train",
                                        "--mesh", "fsdp=2,tensor=2", "--batch", "4", "--seq-len", "128")
    assert code == 0, out
    check_sane(report, "train", "v5e:2x2", {"data": 1, "fsdp": 2, "tensor": 2})
    assert report["options"]["attention_backend"] == "pallas"
    assert report["options"]["param_dtype"] == "float32" and report["options"]["dtype"] == "bfloat16"
    assert report["shapes"]["microbatch"] == [1, 4, 128]
    assert report["mosaic_kernels"] >= 3, report["custom_calls"]  # forward, dq, dk/dv
    assert report["collectives"]["all-gather"]["count"] > 0 and report["collectives"]["all-reduce"]["count"] > 0
    mem = report["per_device_bytes"]
    assert mem["aliased"] > 0.9 * mem["arguments"]  # the donated state is updated in place
    assert "fits            yes" in out and "v5e:2x2: 4 x TPU v5 lite" in out


def _sharded_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        mesh, spec = leaf.sharding.mesh, leaf.sharding.spec
        ways = math.prod(mesh.shape[a] for part in spec if part for a in ((part,) if isinstance(part, str) else part))
        total += leaf.size * leaf.dtype.itemsize // ways
    return total


def test_train_arguments_are_the_sharded_state_and_batch():
    """v6e:2x2 with data parallelism (data=2, fsdp=2): the compiler's argument bytes are the f32 params + AdamW
    moments + batch as the rule table shards them (up to TPU tile padding); gradients are all-reduced."""
    from omni_jax.config import OmniConfig
    from omni_jax.tpu_compile import programs, report
    from omni_jax.tpu_compile.topology import load_topology, slice_mesh

    tpu = load_topology("v6e:2x2")
    mesh = slice_mesh(tpu, {"data": 2, "fsdp": 2})
    options = programs.runtime_options("bfloat16", "float32", "xla")
    shape = programs.JobShape(batch=8, seq_len=64, max_len=0, grad_accum=2)
    program = programs.build_program("train", OmniConfig.from_yaml(TINY), options, mesh, shape)
    state, batch = program.args
    expected = _sharded_bytes(state) + _sharded_bytes(batch)
    params = program.shapes["params"]
    assert expected > 3 * 4 * params / 4  # f32 params, mu, nu over fsdp=2 at least (embeddings: fsdp x tensor)
    memory, _ = report.memory_bytes(program.lower().compile())
    assert expected <= memory["arguments"] <= 1.1 * expected, (memory, expected)
    assert batch["input_ids"].shape == (2, 4, 64)  # [k, B/k, L]


@pytest.mark.slow
def test_prefill_compiles_with_mosaic_attention(tmp_path, capsys):
    code, report, out, _ = compile_json(tmp_path, capsys, "--topology", "v5e:2x2", "--job", "prefill",
                                        "--mesh", "fsdp=2,tensor=2", "--batch", "4", "--seq-len", "128",
                                        "--max-len", "256")
    assert code == 0, out
    check_sane(report, "prefill", "v5e:2x2", {"data": 1, "fsdp": 2, "tensor": 2})
    assert report["mosaic_kernels"] >= 1, report["custom_calls"]
    assert report["options"]["param_dtype"] == "bfloat16"  # serving weights
    assert report["shapes"]["kv_cache"] == [2, 4, 256, 2, 16]  # [layers, B, max_len, kv heads, head_dim]


@pytest.mark.slow
def test_decode_step_compiles(tmp_path, capsys):
    code, report, out, _ = compile_json(tmp_path, capsys, "--topology", "v6e:2x2", "--job", "decode",
                                        "--mesh", "data=2,tensor=2", "--batch", "4", "--seq-len", "64",
                                        "--max-len", "192")
    assert code == 0, out
    check_sane(report, "decode", "v6e:2x2", {"data": 2, "fsdp": 1, "tensor": 2})
    assert report["mosaic_kernels"] >= 1, report["custom_calls"]  # the flash kernel, one query padded to a tile
    assert report["per_device_bytes"]["aliased"] > 0  # the decode state (KV cache) is updated in place
    assert report["collectives"]["all-reduce"]["count"] > 0  # tensor-parallel projections


def test_paged_decode_step_compiles_with_the_ragged_paged_attention_kernel(tmp_path, capsys):
    """The continuous engine's decode step (omni_jax/paged_generation.py) for TPU: 8 slots over a pool of 16-token
    pages split over the data axis, kv heads over tensor; one ragged paged attention kernel per layer, the pools
    updated in place. The kernel needs 128-lane heads: the tiny LM gets head_dim 128 (and M-RoPE sections to
    match)."""
    code, report, out, _ = compile_json(tmp_path, capsys, "--topology", "v6e:2x2", "--job", "paged-decode",
                                        "--mesh", "data=2,tensor=2", "--batch", "8", "--seq-len", "64",
                                        "--max-len", "256", "--page-size", "16",
                                        "--override", "thinker.text.head_dim=128",
                                        "--override", "thinker.text.mrope_section=[16,24,24]")
    assert code == 0, out
    check_sane(report, "paged-decode", "v6e:2x2", {"data": 2, "fsdp": 1, "tensor": 2})
    assert report["shapes"]["pool_pages"] == 8 * 64 // 16 + 2 and report["shapes"]["pages_per_row"] == 16
    assert report["mosaic_kernels"] == 2, report["custom_calls"]  # one ragged kernel per layer of the tiny LM
    assert report["per_device_bytes"]["aliased"] > 0  # the page pools are donated and written in place
    assert not set(report["custom_calls"]) & set(CPU_KERNELS)


def test_multimodal_train_step_compiles_with_frozen_encoders(tmp_path, capsys):
    """A train step with audio, image and video buckets (as data.media_buckets) compiles for TPU; the encoders'
    inputs are in the program, and freezing them (train.freeze) takes their backward pass out: fewer model FLOPs
    and less temporary memory, and no AdamW moments for them (fewer argument bytes)."""
    from omni_jax.config import OmniConfig
    from omni_jax.tpu_compile import programs, report
    from omni_jax.tpu_compile.topology import load_topology, slice_mesh

    mesh = slice_mesh(load_topology("v6e:2x2"), {"fsdp": 4})
    options = programs.runtime_options("bfloat16", "float32", "pallas", "full")
    shape = programs.JobShape(batch=4, seq_len=256, max_len=0)
    buckets = {"audio_chunks": 8, "image_patches": 256, "video_patches": 512}
    reports = {}
    for freeze in ((), ("audio_encoder", "vision_encoder")):
        program = programs.build_program("train", OmniConfig.from_yaml(TINY), options, mesh, shape,
                                         programs.TrainSettings(media_buckets=buckets, freeze=freeze))
        assert program.shapes["video_patches"][:2] == [1, 512] and program.shapes["audio_chunks"][:2] == [1, 8]
        compiled = program.lower().compile()
        reports[freeze] = (program.model_flops, report.memory_bytes(compiled)[0], compiled.as_text())
    (flops, memory, text), (frozen_flops, frozen_memory, frozen_text) = reports.values()
    assert frozen_flops < flops
    assert frozen_memory["arguments"] < memory["arguments"]
    assert frozen_memory["temporaries"] < memory["temporaries"], (frozen_memory, memory)
    for program_text in (text, frozen_text):
        assert hlo.mosaic_kernels(program_text) >= 3
        assert not set(hlo.custom_calls(program_text)) & set(CPU_KERNELS)


@pytest.mark.slow
def test_talker_decode_step_compiles(tmp_path, capsys):
    code, report, out, _ = compile_json(tmp_path, capsys, "--topology", "v6e:2x2", "--job", "talker-decode",
                                        "--mesh", "fsdp=2,tensor=2", "--batch", "4", "--seq-len", "34",
                                        "--max-len", "160")
    assert code == 0, out
    check_sane(report, "talker-decode", "v6e:2x2", {"data": 1, "fsdp": 2, "tensor": 2})
    assert report["mosaic_kernels"] >= 1, report["custom_calls"]
    assert report["shapes"]["reply"][:2] == [4, 126]  # [B, max_len - seq_len, E]
    assert report["per_device_bytes"]["aliased"] > 0  # the talker cache is updated in place
    assert report["roofline"]["tokens_per_step"] == 4


# A BigVGAN with one upsample stage and one resblock: the released structure per op, few ops (the TPU compiler
# takes seconds per float32 HIGHEST convolution, minutes for the whole released vocoder; bench/tpu_presets.sh
# compiles that one)
SMALL_VOCODER = ("token2wav.bigvgan.upsample_rates=[4]", "token2wav.bigvgan.upsample_kernel_sizes=[8]",
                 "token2wav.bigvgan.resblock_kernel_sizes=[3]", "token2wav.bigvgan.resblock_dilation_sizes=[[1]]")


@pytest.mark.slow
def test_token2wav_round_compiles_without_cpu_paths(tmp_path, capsys):
    """One streamed Token2Wav round (DiT ODE over a 144-frame window, BigVGAN over 135 frames) for 4 rows fits,
    with no CPU kernel (the vocoder's TPU form: test_bigvgan.py)."""
    overrides = [flag for o in SMALL_VOCODER for flag in ("--override", o)]
    code, report, out, _ = compile_json(tmp_path, capsys, "--topology", "v6e:2x2", "--job", "token2wav",
                                        "--mesh", "fsdp=4", "--batch", "4", *overrides)
    assert code == 0, out
    check_sane(report, "token2wav", "v6e:2x2", {"data": 1, "fsdp": 4, "tensor": 1})
    assert report["shapes"]["dit_window"] == 144 and report["shapes"]["vocoder_window"] == 135
    assert report["shapes"]["ref_mel_frames"] == 300
    assert report["roofline"] is None  # not modelled for this job


# ------------------------------------------------------------------------------------------ does not fit: exit 3
def test_a_config_too_large_does_not_fit_through_the_real_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "omni_jax", "compile", "--topology", "v5e:2x2", "--job", "train",
         "--model-config", TINY, "--batch", "256", "--seq-len", "4096", "--mesh", "fsdp=4",
         "--attention-backend", "xla", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit: needs ") and "GiB per chip of " in last, result.stdout
    assert "Traceback" not in result.stderr
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["per_device_bytes"]["total"] > report["hbm_bytes"]
