"""HF <-> omni_jax weight conversion: the mapping table, Orbax param checkpoints, convert / export.

Tiny random HF models are built here (every parameter re-drawn, so a swapped or mis-transposed tensor cannot
hide behind HF's constant initialisations) and saved with `save_pretrained`.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerConfig,
                          Qwen2_5OmniThinkerForConditionalGeneration)

from convert.hf_to_orbax import convert, main as convert_main
from convert.orbax_to_hf import export, main as export_main
from omni_jax.checkpoint import (ParamsWriter, iter_params, load_params, params_metadata, save_params)
from omni_jax.config import OmniConfig
from omni_jax.voices import read_voices
from omni_jax.hf_mapping import (CONV1D, CONV_TRANSPOSE1D, FLATTEN_IN, IDENTITY, LINEAR, CheckpointMismatchError,
                                 flatten_params, iter_hf_tensors, load_hf_params, merge_heads_in, rules_for,
                                 split_heads_bias, split_heads_out)
from omni_jax.weights.safetensors_io import SafetensorsWriter, index_hf_dir, read_tensor

VOCAB = 512
TOKEN_IDS = dict(audio_token_index=500, image_token_index=501, video_token_index=502, audio_start_token_id=503,
                 audio_end_token_id=504, vision_start_token_id=505, vision_end_token_id=506, bos_token_id=507,
                 eos_token_id=508, pad_token_id=509)
TOKENIZER_FILES = {"tokenizer_config.json": '{"model_max_length": 32768}', "vocab.json": '{"a": 0}',
                   "merges.txt": "#version: 0.2\n", "chat_template.json": '{"chat_template": "x"}'}


# ------------------------------------------------------------------------------------------ tiny models

def _thinker_config() -> Qwen2_5OmniThinkerConfig:
    # distinct sizes everywhere so that a wrong transpose / reshape changes a shape
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]}),
        audio_config=dict(d_model=40, encoder_layers=2, encoder_attention_heads=5, encoder_ffn_dim=56,
                          num_mel_bins=16, output_dim=48, n_window=100, max_source_positions=1500),
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=72, out_hidden_size=48,
                           fullatt_block_indexes=[2], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        **TOKEN_IDS)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def _save(model, path, tokenizer=True) -> str:
    model.save_pretrained(str(path))
    if tokenizer:
        for name, text in TOKENIZER_FILES.items():
            (path / name).write_text(text)
    return str(path)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _assert_same_tree(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k  # bitwise


def _disk_tensors(hf_dir) -> dict:
    out = {}
    for info in index_hf_dir(hf_dir).values():
        out[info.name] = read_tensor(info)
    return out


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    model = _randomize(Qwen2_5OmniThinkerForConditionalGeneration(_thinker_config()), seed=0)
    path = _save(model, tmp_path_factory.mktemp("hf_thinker"))
    return model, path


@pytest.fixture(scope="module")
def converted(thinker, tmp_path_factory):
    _, hf_dir = thinker
    out = str(tmp_path_factory.mktemp("conv") / "ckpt")
    meta = convert(hf_dir, out)
    return out, meta


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    thinker_cfg = _thinker_config()
    cfg = Qwen2_5OmniConfig(
        thinker_config=thinker_cfg.to_dict(),
        talker_config=dict(vocab_size=8448, embedding_size=48, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                           tts_text_start_token_id=510, tts_text_end_token_id=511, tts_text_pad_token_id=499,
                           **{k: v for k, v in TOKEN_IDS.items() if k not in ("bos_token_id", "eos_token_id",
                                                                              "pad_token_id")}),
        token2wav_config=dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                            enc_emb_dim=8, enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8,
                            enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0]),
            bigvgan_config=dict(upsample_initial_channel=64)))
    model = _randomize(Qwen2_5OmniForConditionalGeneration(cfg), seed=1)
    path = tmp_path_factory.mktemp("hf_full")
    _save(model, path)
    gen = torch.Generator().manual_seed(3)
    torch.save({name: {"cond": torch.randn(8, generator=gen), "ref_mel": torch.randn(1, 30, 80, generator=gen),
                       "bos_token": bos} for name, bos in (("Chelsie", 1), ("Ethan", 2))}, str(path / "spk_dict.pt"))
    return model, str(path)


# ------------------------------------------------------------------------------------------ the table

def test_load_hf_params_maps_back_to_identical_hf_tensors(thinker):
    model, hf_dir = thinker
    cfg = OmniConfig.from_pretrained(hf_dir)
    params = load_hf_params(hf_dir, cfg)
    disk = _disk_tensors(hf_dir)
    back = dict(iter_hf_tensors(params, cfg))
    assert sorted(back) == sorted(disk)  # thinker-only layout: model.*, audio_tower.*, visual.*, lm_head
    for name, array in back.items():
        assert array.dtype == disk[name].dtype and np.array_equal(array, disk[name]), name

    # spot checks of the layouts against the torch modules
    sd = model.state_dict()
    t = params["thinker"]
    wq = sd["model.language_model.layers.1.self_attn.q_proj.weight"].numpy()  # [H*hd, D]
    np.testing.assert_array_equal(t["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"][1],
                                  wq.T.reshape(48, 4, 12))
    wo = sd["model.language_model.layers.2.self_attn.o_proj.weight"].numpy()  # [D, H*hd]
    np.testing.assert_array_equal(t["decoder"]["layers"]["self_attn"]["o_proj"]["kernel"][2],
                                  wo.T.reshape(4, 12, 48))
    np.testing.assert_array_equal(t["lm_head"]["kernel"], sd["lm_head.weight"].numpy().T)
    np.testing.assert_array_equal(t["audio_tower"]["conv1"]["kernel"],
                                  sd["model.audio_tower.conv1.weight"].numpy().transpose(2, 1, 0))
    np.testing.assert_array_equal(t["visual"]["patch_embed"]["kernel"],
                                  sd["model.visual.patch_embed.proj.weight"].numpy().reshape(32, -1).T)
    assert t["visual"]["merger"]["mlp_0"]["kernel"].shape == (128, 128)
    assert "bias" not in t["audio_tower"]["layers"]["self_attn"]["k_proj"]


def test_transforms_invert_and_match_torch_convs():
    rng = np.random.default_rng(0)
    cases = [(IDENTITY, (3, 5)), (LINEAR, (6, 4)), (CONV1D, (6, 4, 3)), (CONV_TRANSPOSE1D, (6, 4, 5)),
             (FLATTEN_IN, (8, 3, 2, 2, 2)), (split_heads_out(3, 4), (12, 5)), (split_heads_bias(3, 4), (12,)),
             (merge_heads_in(3, 4), (5, 12))]
    for tf, shape in cases:
        x = rng.standard_normal(shape).astype(np.float32)
        y = tf.forward(x)
        assert y.shape == tf.shape(shape), tf
        np.testing.assert_array_equal(tf.inverse(np.ascontiguousarray(y), shape), x)

    import flax.linen as nn

    x = rng.standard_normal((2, 4, 11)).astype(np.float32)  # torch [B, C_in, T]
    conv = torch.nn.Conv1d(4, 6, 3, padding=1)
    ours = nn.Conv(6, (3,), padding=((1, 1),))
    got = ours.apply({"params": {"kernel": CONV1D.forward(conv.weight.detach().numpy()),
                                 "bias": conv.bias.detach().numpy()}}, x.transpose(0, 2, 1))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1), conv(torch.tensor(x)).detach().numpy(),
                               atol=1e-5)

    for k, s in ((4, 2), (7, 3), (11, 5)):  # BigVGAN ups: padding (k - s) // 2 cropped on both sides
        p = (k - s) // 2
        tconv = torch.nn.ConvTranspose1d(4, 6, k, s, padding=p)
        ours = nn.ConvTranspose(6, (k,), strides=(s,), padding="VALID")
        got = ours.apply({"params": {"kernel": CONV_TRANSPOSE1D.forward(tconv.weight.detach().numpy()),
                                     "bias": tconv.bias.detach().numpy()}}, x.transpose(0, 2, 1))
        got = np.asarray(got)[:, p:got.shape[1] - p].transpose(0, 2, 1)
        np.testing.assert_allclose(got, tconv(torch.tensor(x)).detach().numpy(), atol=1e-5)


def test_in_memory_names_are_accepted(thinker, full_model, tmp_path):
    model, hf_dir = thinker
    # transformers-5 in-memory names (model.language_model.*, model.audio_tower.*, model.visual.*)
    mem_dir = tmp_path / "in_memory"
    mem_dir.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), mem_dir / "config.json")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in sd)
    save_file(sd, str(mem_dir / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_tree(load_hf_params(str(mem_dir)), load_hf_params(hf_dir))

    # full-model root: thinker.model.language_model.* etc.
    full, full_dir = full_model
    mem_full = tmp_path / "in_memory_full"
    mem_full.mkdir()
    shutil.copy(os.path.join(full_dir, "config.json"), mem_full / "config.json")
    fsd = {k: v.contiguous() for k, v in full.state_dict().items() if k.startswith("thinker.")}
    assert any(k.startswith("thinker.model.language_model.") for k in fsd)
    save_file(fsd, str(mem_full / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_tree(load_hf_params(str(mem_full), thinker_only=True), load_hf_params(full_dir, thinker_only=True))


def test_mismatches_are_reported_together(thinker, tmp_path):
    _, hf_dir = thinker
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), bad / "config.json")
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]                              # missing
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 4)           # unexpected
    sd["visual.blocks.2.attn.q.bias"] = torch.zeros(31)                      # wrong shape (32 expected)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(CheckpointMismatchError) as info:
        load_hf_params(str(bad))
    err = info.value
    msg = str(err)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "[80, 48]" in msg
    assert "model.layers.0.mlp.extra_proj.weight" in msg
    assert "visual.blocks.2.attn.q.bias" in msg and "expected [32], got [31]" in msg
    assert len(err.missing) == len(err.unexpected) == len(err.mismatched) == 1
    assert isinstance(err, ValueError)

    out = tmp_path / "out"
    with pytest.raises(CheckpointMismatchError):
        convert(str(bad), str(out))
    assert not os.path.exists(out)  # validated before anything is written


# ------------------------------------------------------------------------------------------ convert / export

def test_convert_then_load_params_is_bitwise_equal(thinker, converted):
    _, hf_dir = thinker
    out, meta = converted
    _assert_same_tree(load_params(out), load_hf_params(hf_dir))
    assert meta["format_version"] == 1 and meta["thinker_only"] and meta["dtype"] == "float32"
    with open(os.path.join(out, "omni_jax.json")) as f:
        assert json.load(f) == meta
    with open(os.path.join(hf_dir, "config.json"), "rb") as a, open(os.path.join(out, "config.json"), "rb") as b:
        assert a.read() == b.read()  # verbatim
    for name in list(TOKENIZER_FILES) + ["generation_config.json"]:
        assert os.path.exists(os.path.join(out, name)), name
    # a plain Orbax checkpoint, whatever wrote it
    from orbax.checkpoint import v1 as ocp

    raw = ocp.load(os.path.join(out, "params"))
    _assert_same_tree(raw, load_params(out))
    meta_tree = flatten_params(params_metadata(out))
    assert meta_tree[("thinker", "decoder", "layers", "mlp", "up_proj", "kernel")].shape == (3, 48, 80)
    with pytest.raises(FileExistsError):
        convert(hf_dir, out)


def test_export_loads_in_transformers_with_identical_state_dict(thinker, converted, tmp_path):
    model, _ = thinker
    ckpt, _ = converted
    out = tmp_path / "exported"
    index = export(ckpt, str(out), max_shard_bytes=400_000)  # force several shards
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == files
    for name in TOKENIZER_FILES:
        assert os.path.exists(out / name)
    loaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out)).eval()
    _assert_same_state(_state(loaded), _state(model))


def test_bfloat16_conversion_equals_torch_cast(thinker, tmp_path):
    model, hf_dir = thinker
    out = tmp_path / "bf16"
    assert convert_main([hf_dir, str(out), "--dtype", "bfloat16"]) == 0
    params = load_params(str(out))
    leaves = flatten_params(params)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in leaves.values())
    cfg = OmniConfig.from_pretrained(hf_dir)
    ref = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, array in iter_hf_tensors(params, cfg):
        want = ref[name].to(torch.bfloat16).view(torch.int16).numpy()
        np.testing.assert_array_equal(array.view(np.int16), want, err_msg=name)
    with open(out / "omni_jax.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"

    # export of the bf16 checkpoint: bf16 safetensors; transformers loads the same values
    exported = tmp_path / "bf16_hf"
    assert export_main([str(out), str(exported)]) == 0
    with safe_open(str(next(exported.glob("model-*.safetensors"))), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    loaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(exported), dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in _state(model).items()}
    _assert_same_state(_state(loaded), want)


def test_bf16_safetensors_are_read_exactly(thinker, tmp_path):
    """BF16 on disk (the release): read raw into ml_dtypes.bfloat16, same bits as safetensors' torch reader."""
    model, _ = thinker
    path = tmp_path / "bf16_src"
    bf16 = Qwen2_5OmniThinkerForConditionalGeneration(_thinker_config())
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16).save_pretrained(str(path))
    for info in index_hf_dir(str(path)).values():
        ours = read_tensor(info)
        assert ours.dtype == ml_dtypes.bfloat16
        with safe_open(info.file, framework="pt") as f:
            want = f.get_tensor(info.name).view(torch.int16).numpy()
        np.testing.assert_array_equal(ours.view(np.int16), want)
    params = load_hf_params(str(path))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flatten_params(params).values())
    f32 = load_hf_params(str(path), dtype="float32")  # upcast is exact
    for k, v in flatten_params(f32).items():
        np.testing.assert_array_equal(v, flatten_params(params)[k].astype(np.float32))


def test_full_model_round_trip_with_speakers(full_model, tmp_path):
    """Talker, token2wav and spk_dict.pt convert and export back to what transformers loads, bit for bit."""
    model, hf_dir = full_model
    out = tmp_path / "full"
    meta = convert(hf_dir, str(out))
    assert not meta["thinker_only"]
    params = load_params(str(out))
    assert sorted(params) == ["talker", "thinker", "token2wav"]
    assert sorted(params["token2wav"]) == ["code2wav_bigvgan_model", "code2wav_dit_model"]
    voices = read_voices(str(out))  # torch-free format in our checkpoint
    assert sorted(voices) == ["Chelsie", "Ethan"] and voices["Ethan"].bos_token == 2
    assert voices["Chelsie"].ref_mel.shape == (30, 80)
    exported = tmp_path / "full_hf"
    export(str(out), str(exported))
    loaded = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(exported))  # needs spk_dict.pt
    _assert_same_state(_state(loaded), _state(model))
    original = torch.load(os.path.join(hf_dir, "spk_dict.pt"), weights_only=True)
    for name, entry in original.items():
        assert torch.equal(loaded.speaker_map[name]["cond"], entry["cond"])
        assert torch.equal(loaded.speaker_map[name]["ref_mel"], entry["ref_mel"])
        assert loaded.speaker_map[name]["bos_token"] == entry["bos_token"]


def test_full_model_thinker_only(full_model, tmp_path):
    model, hf_dir = full_model
    n_optional = sum(1 for k in model.state_dict() if k.startswith(("talker.", "token2wav.")))
    out = tmp_path / "thinker_only"
    meta = convert(hf_dir, str(out), thinker_only=True)
    assert meta["thinker_only"] and meta["skipped_tensors"] == n_optional
    assert meta["skipped_files"] == ["spk_dict.pt"]
    params = load_params(str(out))
    assert list(params) == ["thinker"]
    thinker_sd = {k[len("thinker."):]: v for k, v in model.state_dict().items() if k.startswith("thinker.")}
    # the thinker of the full model == a standalone thinker with the same weights
    ref = Qwen2_5OmniThinkerForConditionalGeneration(_thinker_config())
    ref.load_state_dict(thinker_sd)
    exported = tmp_path / "thinker_hf"
    export(str(out), str(exported))
    with open(exported / "config.json") as f:
        assert json.load(f)["model_type"] == "qwen2_5_omni_thinker"
    loaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(exported))
    _assert_same_state(_state(loaded), _state(ref))


def test_rules_come_from_the_config():
    cfg = OmniConfig.from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", "models",
                                            "qwen2_5_omni_3b.yaml"))
    rows = {r.ours: r for r in rules_for(cfg)}
    assert rows["thinker/decoder/layers/mlp/up_proj/kernel"].our_shape == (36, 2048, 11008)
    assert rows["thinker/decoder/layers/self_attn/k_proj/kernel"].hf_shape == (256, 2048)
    assert rows["thinker/embed_tokens/embedding"].hf_shape == (151936, 2048)
    assert rows["thinker/visual/patch_embed/kernel"].our_shape == (1176, 1280)
    assert rows["thinker/audio_tower/proj/kernel"].our_shape == (1280, 2048)
    assert len(rows["thinker/audio_tower/layers/fc1/kernel"].hf_names()) == 32


# ------------------------------------------------------------------------------------------ Orbax + files

def test_save_load_params_numpy_and_sharded(tmp_path):
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.standard_normal((8, 6)).astype(np.float32),
                    "bias": rng.standard_normal((6,)).astype(ml_dtypes.bfloat16)},
              "b": {"scale": np.arange(16, dtype=np.float32).reshape(2, 8)}}
    save_params(str(tmp_path / "p"), params)
    _assert_same_tree(load_params(str(tmp_path / "p")), params)
    with pytest.raises(Exception):
        save_params(str(tmp_path / "p"), params)  # no silent overwrite

    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    got = load_params(str(tmp_path / "p"), {"a": {"kernel": shard}, "b": {"scale": repl}})
    assert sorted(flatten_params(got)) == [("a", "kernel"), ("b", "scale")]  # only the named subset
    assert isinstance(got["a"]["kernel"], jax.Array) and got["a"]["kernel"].sharding == shard
    np.testing.assert_array_equal(np.asarray(got["a"]["kernel"]), params["a"]["kernel"])
    got = load_params(str(tmp_path / "p"), dtype="bfloat16")
    assert got["b"]["scale"].dtype == ml_dtypes.bfloat16

    # sharded jax.Arrays saved, read back as numpy; streaming writer gives the same checkpoint
    sharded = jax.device_put(params["a"]["kernel"], shard)
    save_params(str(tmp_path / "q"), {"k": sharded})
    np.testing.assert_array_equal(load_params(str(tmp_path / "q"))["k"], params["a"]["kernel"])
    with ParamsWriter(str(tmp_path / "w"), buffer_bytes=64) as w:
        for path, leaf in flatten_params(params).items():
            w.write(path, leaf)
    _assert_same_tree(load_params(str(tmp_path / "w")), params)
    assert not os.path.exists(str(tmp_path / "w") + ".partial_save")
    with ParamsWriter(str(tmp_path / "c"), chunk_bytes=32) as w:  # chunked along the leading axis
        w.write_tree(params)
    _assert_same_tree(load_params(str(tmp_path / "c")), params)
    from orbax.checkpoint import v1 as ocp

    chunks = ocp.metadata(str(tmp_path / "c")).metadata["b"]["scale"].storage_metadata.chunk_shape
    assert chunks == (1, 8)
    with pytest.raises(RuntimeError):  # an error inside the block leaves nothing behind
        with ParamsWriter(str(tmp_path / "z")) as w:
            w.write(("a",), np.ones(3, np.float32))
            w.flush()
            raise RuntimeError("boom")
    assert not os.path.exists(tmp_path / "z") and not os.path.exists(str(tmp_path / "z") + ".partial_save")
    for path, leaf in iter_params(str(tmp_path / "w"), batch_bytes=1):
        np.testing.assert_array_equal(leaf, flatten_params(params)[path])


def test_safetensors_writer_is_read_by_the_reference_reader(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"b": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
               "a": rng.standard_normal((7,)).astype(np.float32), "e": np.zeros((0, 4), np.float16),
               "i": np.arange(5, dtype=np.int64)}
    path = str(tmp_path / "x.safetensors")
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()]) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            t = f.get_tensor(k)
            want = v.view(np.int16) if v.dtype == ml_dtypes.bfloat16 else v
            got = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        with SafetensorsWriter(str(tmp_path / "y.safetensors"), [("a", np.float32, (2,))]) as w:
            w.write("a", np.zeros(3, np.float32))
    assert not os.path.exists(tmp_path / "y.safetensors") and not os.path.exists(tmp_path / "y.safetensors.tmp")
