"""Tests for omni_jax.config: HF round trips, YAML presets, overrides, validation, HF model construction.

Fixtures tests/fixtures/qwen2_5_omni_{7b,3b}_config.json: the released config.json files of
Qwen/Qwen2.5-Omni-7B / -3B could not be fetched (no Hub access; no verbatim copy found in public code or
issues). They are RECONSTRUCTIONS in the transformers-4.x layout the released files use: written by
transformers==4.52.4 `Qwen2_5OmniConfig(...).to_json_string(use_diff=True)` (sort_keys) with the released
values (spec §2.2; 3B talker 896/24L/14H/2KV/head_dim 64/ffn 4864/embedding 2048 from a third-party reader of
the 3B config.json, its mrope_section [8, 12, 12] assumed), plus keys that copies quoted in public issues and
readers show in the released files (architectures, _name_or_path, enable_talker, torch_dtype, thinker
vision_start/end/vision_token ids, bos/eos/pad ids, vision embed_dim / tokens_per_second, DiT dim/depth/heads),
and transformers_version "4.50.0.dev0". Replace them with the real files when available: the tests must pass
unchanged.
"""

import copy
import dataclasses
import json
import os

import pytest

from omni_jax.config import (
    AudioEncoderConfig, BigVGANConfig, DiTConfig, OmniConfig, RuntimeOptions, TalkerConfig, TextConfig,
    ThinkerConfig, Token2WavConfig, VisionEncoderConfig, apply_overrides,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PRESETS = os.path.join(ROOT, "configs", "models")


def load_fixture(size):
    with open(os.path.join(FIXTURES, f"qwen2_5_omni_{size}_config.json")) as f:
        return json.load(f)


def transformers_or_skip():
    return pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("size", ["7b", "3b"])
def test_released_config_round_trip_exact(size):
    d = load_fixture(size)
    cfg = OmniConfig.from_hf_config(copy.deepcopy(d))
    out = cfg.to_hf_config()
    assert out == d
    assert json.dumps(out, sort_keys=True) == json.dumps(d, sort_keys=True)  # int/float kept as written
    assert hash(cfg) == hash(OmniConfig.from_hf_config(d))


@pytest.mark.parametrize("size", ["7b", "3b"])
def test_released_config_thinker_only_round_trip(size):
    thinker = load_fixture(size)["thinker_config"]
    cfg = OmniConfig.from_hf_config(thinker)
    assert cfg.talker is None and cfg.token2wav is None and cfg.enable_audio_output is False
    assert cfg.to_hf_config() == thinker
    assert cfg.to_hf_config(thinker_only=False)["model_type"] == "qwen2_5_omni"


def test_released_7b_values():
    cfg = OmniConfig.from_hf_config(load_fixture("7b"))
    text, talker = cfg.thinker.text, cfg.talker
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.vocab_size, text.mrope_section) == (3584, 28, 28, 4, 128, 152064, (16, 24, 24))
    assert text.num_query_groups == 7 and text.rope_theta == 1e6
    assert cfg.thinker.vision.hidden_size == 1280 and cfg.thinker.vision_start_token_id == 151652
    assert (talker.hidden_size, talker.num_hidden_layers, talker.num_attention_heads,
            talker.num_key_value_heads, talker.head_dim, talker.embedding_size) == (896, 24, 12, 4, 128, 3584)
    assert cfg.token2wav.bigvgan.upsample_factor == 240
    assert "head_dim" not in cfg.to_hf_config()["thinker_config"]["text_config"]
    # unmodelled keys are kept in `extra`, which eq/hash ignore
    assert cfg.extra["enable_talker"] is True
    assert cfg.thinker.text.extra["torch_dtype"] == "bfloat16"


def test_released_3b_values():
    cfg = OmniConfig.from_hf_config(load_fixture("3b"))
    text = cfg.thinker.text
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size, text.head_dim) == (2048, 36, 16, 2, 11008, 151936, 128)
    assert cfg.thinker.audio.output_dim == cfg.thinker.vision.out_hidden_size == 2048
    assert cfg.talker.embedding_size == 2048


def test_modified_config_emits_changes_in_source_layout():
    d = load_fixture("7b")
    cfg = apply_overrides(OmniConfig.from_hf_config(d), [
        "thinker.text.num_hidden_layers=4", "thinker.text.rope_theta=10000.0",
        "thinker.text.mrope_section=[8, 28, 28]", "thinker.audio.encoder_layers=3",
        "token2wav.dit.hidden_size=512"])
    out = cfg.to_hf_config()
    text = out["thinker_config"]["text_config"]
    assert text["num_hidden_layers"] == 4 and text["rope_theta"] == 10000.0
    assert text["rope_scaling"]["mrope_section"] == [8, 28, 28]
    audio = out["thinker_config"]["audio_config"]
    assert audio["encoder_layers"] == 3 and audio["num_hidden_layers"] == 3  # 4.x alias follows
    dit = out["token2wav_config"]["dit_config"]
    assert dit["hidden_size"] == dit["dim"] == 512
    assert OmniConfig.from_hf_config(out) == cfg


# ------------------------------------------------------------------------------------------ transformers 5

def tiny_hf_kwargs(tf):
    """Tiny Qwen2_5OmniConfig kwargs in the transformers-5 layout."""
    return dict(
        thinker_config=dict(
            text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
            audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                              output_dim=64),
            vision_config=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=64,
                               fullatt_block_indexes=[1]),
            vision_start_token_id=151652),
        talker_config=dict(embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        token2wav_config=dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                            enc_dim=16, enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=8,
                            enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0]),
            bigvgan_config=dict(upsample_initial_channel=64)),
    )


def test_transformers5_layout_round_trip(tmp_path):
    tf = transformers_or_skip()
    hf_config = tf.Qwen2_5OmniConfig(**tiny_hf_kwargs(tf))
    hf_config.save_pretrained(str(tmp_path))  # diff layout, as written into a checkpoint directory
    saved = json.loads((tmp_path / "config.json").read_text())
    assert OmniConfig.from_pretrained(str(tmp_path)).to_hf_config() == saved
    d = hf_config.to_dict()
    assert "rope_parameters" in d["thinker_config"]["text_config"]
    cfg = OmniConfig.from_hf_config(copy.deepcopy(d))
    assert cfg.to_hf_config() == d
    assert cfg.thinker.text.head_dim == 16 and cfg.thinker.text.mrope_section == (2, 3, 3)
    assert cfg.talker.mrope_section == (2, 3, 3) and cfg.token2wav.dit.rope_theta == 10000.0
    # overriding the layer count keeps the 5.x `layer_types` list consistent
    out = apply_overrides(cfg, ["thinker.text.num_hidden_layers=3"]).to_hf_config()
    assert out["thinker_config"]["text_config"]["layer_types"] == ["full_attention"] * 3
    # thinker-only, transformers-5 layout
    thinker = tf.Qwen2_5OmniThinkerConfig(**tiny_hf_kwargs(tf)["thinker_config"]).to_dict()
    assert OmniConfig.from_hf_config(thinker).to_hf_config() == thinker


@pytest.mark.parametrize("size", ["7b", "3b"])
def test_released_config_through_transformers5(size):
    """transformers 5 reads the 4.x file; its to_dict() (5.x layout) round trips and means the same model."""
    tf = transformers_or_skip()
    d = tf.Qwen2_5OmniConfig(**load_fixture(size)).to_dict()
    cfg = OmniConfig.from_hf_config(d)
    assert cfg.to_hf_config() == d
    released = OmniConfig.from_hf_config(load_fixture(size))
    # HF 5 sets sliding_window to None when use_sliding_window is false; everything else is equal
    norm = ["thinker.text.sliding_window=null", "talker.sliding_window=null"]
    assert apply_overrides(released, norm) == cfg


# ------------------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("name", ["tiny", "qwen2_5_omni_3b", "qwen2_5_omni_7b"])
def test_presets_load_and_validate(name, tmp_path):
    cfg = OmniConfig.from_yaml(os.path.join(PRESETS, f"{name}.yaml"))
    cfg.validate()
    path = str(tmp_path / "again.yaml")
    cfg.to_yaml(path)
    assert OmniConfig.from_yaml(path) == cfg


def test_7b_preset_equals_released_config():
    preset = OmniConfig.from_yaml(os.path.join(PRESETS, "qwen2_5_omni_7b.yaml"))
    released = OmniConfig.from_hf_config(load_fixture("7b"))
    assert preset == released  # eq compares every modelled field (not `extra`)
    assert preset.to_dict() == released.to_dict()
    assert preset == OmniConfig()  # the dataclass defaults are the released 7B


def test_3b_preset_equals_released_config():
    preset = OmniConfig.from_yaml(os.path.join(PRESETS, "qwen2_5_omni_3b.yaml"))
    assert preset == OmniConfig.from_hf_config(load_fixture("3b"))


def test_tiny_preset_values():
    cfg = OmniConfig.from_yaml(os.path.join(PRESETS, "tiny.yaml"))
    text = cfg.thinker.text
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (64, 2, 4, 2, 16, 128, 151936)
    assert cfg.talker.embedding_size == 64 and cfg.token2wav.dit.enc_emb_dim == 192
    assert cfg.token2wav.bigvgan.upsample_factor == 240


def test_partial_yaml_takes_defaults(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("thinker_config:\n  text_config:\n    num_hidden_layers: 3\n    rms_norm_eps: 1e-5\n"
                    "talker_config: null\ntoken2wav_config: null\nenable_audio_output: false\n")
    cfg = OmniConfig.from_yaml(str(path))
    assert cfg.thinker.text.num_hidden_layers == 3 and cfg.thinker.text.rms_norm_eps == 1e-5
    assert cfg.thinker.text.hidden_size == 3584 and cfg.thinker.text.head_dim == 128
    assert cfg.talker is None and cfg.token2wav is None
    path.write_text("thinker_config:\n  text_config:\n    num_hiden_layers: 3\n")
    with pytest.raises(ValueError, match="num_hiden_layers"):
        OmniConfig.from_yaml(str(path))


# ------------------------------------------------------------------------------------------ HF models

def test_tiny_preset_builds_transformers_model():
    tf = transformers_or_skip()
    torch = pytest.importorskip("torch")
    cfg = OmniConfig.from_yaml(os.path.join(PRESETS, "tiny.yaml"))
    model = tf.Qwen2_5OmniForConditionalGeneration(tf.Qwen2_5OmniConfig(**cfg.to_hf_config()))
    text, talker, dit = cfg.thinker.text, cfg.talker, cfg.token2wav.dit
    lm = model.thinker.model.language_model
    assert tuple(lm.embed_tokens.weight.shape) == (text.vocab_size, text.hidden_size)
    assert len(lm.layers) == text.num_hidden_layers
    attn = lm.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (text.num_attention_heads * text.head_dim, text.hidden_size)
    assert tuple(attn.k_proj.weight.shape) == (text.num_key_value_heads * text.head_dim, text.hidden_size)
    audio = model.thinker.model.audio_tower
    assert tuple(audio.conv1.weight.shape) == (cfg.thinker.audio.d_model, cfg.thinker.audio.num_mel_bins, 3)
    assert audio.proj.out_features == text.hidden_size
    visual = model.thinker.model.visual
    assert len(visual.blocks) == cfg.thinker.vision.depth
    assert visual.merger.mlp[-1].out_features == text.hidden_size
    t_attn = model.talker.model.layers[0].self_attn
    assert tuple(t_attn.q_proj.weight.shape) == (talker.num_attention_heads * talker.head_dim, talker.hidden_size)
    assert tuple(model.talker.thinker_to_talker_proj.weight.shape) == (talker.hidden_size, talker.embedding_size)
    dit_model = model.token2wav.code2wav_dit_model
    assert len(dit_model.transformer_blocks) == dit.num_hidden_layers
    assert len(model.token2wav.code2wav_bigvgan_model.ups) == len(cfg.token2wav.bigvgan.upsample_rates)
    # a short thinker forward runs
    logits = model.thinker(input_ids=torch.tensor([[151644, 872, 198, 151645]])).logits
    assert tuple(logits.shape) == (1, 4, text.vocab_size)


def test_text_head_dim_is_written_and_used_by_transformers():
    """HF 5.24 Qwen2_5OmniTextConfig has no head_dim field, but keeps head_dim=24 as an attribute and the
    attention and rotary embedding use it. So an explicit head_dim != hidden // heads is written back."""
    tf = transformers_or_skip()
    cfg = apply_overrides(OmniConfig.from_yaml(os.path.join(PRESETS, "tiny.yaml")),
                          ["thinker.text.head_dim=24", "thinker.text.mrope_section=[4, 4, 4]"])
    thinker_dict = cfg.to_hf_config(thinker_only=True)
    assert thinker_dict["text_config"]["head_dim"] == 24
    model = tf.Qwen2_5OmniThinkerForConditionalGeneration(tf.Qwen2_5OmniThinkerConfig(**thinker_dict))
    lm = model.model.language_model
    assert tuple(lm.layers[0].self_attn.q_proj.weight.shape) == (4 * 24, 64)
    assert tuple(lm.rotary_emb.inv_freq.shape) == (12,)


# ------------------------------------------------------------------------------------------ overrides

def test_overrides():
    cfg = OmniConfig()
    new = apply_overrides(cfg, ["thinker.text.num_hidden_layers=2", "token2wav.dit.look_ahead_layers=[1]",
                                "token2wav.dit.look_backward_layers=[0]", "token2wav.dit.num_hidden_layers=2",
                                "thinker_config.text_config.rms_norm_eps=1e-5", "enable_audio_output=false"])
    assert new.thinker.text.num_hidden_layers == 2 and new.thinker.text.rms_norm_eps == 1e-5
    assert new.token2wav.dit.look_ahead_layers == (1,) and new.enable_audio_output is False
    assert cfg.thinker.text.num_hidden_layers == 28  # frozen: the original is untouched
    assert cfg.replace(**{"thinker.text.num_hidden_layers": 2}).thinker.text.num_hidden_layers == 2
    # a derived head_dim follows hidden_size / heads; an explicit one stays
    small = apply_overrides(cfg, ["thinker.text.hidden_size=1024", "thinker.text.num_attention_heads=16",
                                  "thinker.text.num_key_value_heads=4", "thinker.text.mrope_section=[8,12,12]",
                                  "thinker.audio.output_dim=1024", "thinker.vision.out_hidden_size=1024",
                                  "talker.embedding_size=1024"])
    assert small.thinker.text.head_dim == 64
    assert apply_overrides(OmniConfig(), ["talker=null", "enable_audio_output=false"]).talker is None
    assert apply_overrides(cfg, ["thinker.eos_token_id=[151645, 151643]"]).thinker.eos_token_id == (151645, 151643)
    with pytest.raises(ValueError, match="num_hiden_layers"):
        apply_overrides(cfg, ["thinker.text.num_hiden_layers=2"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(cfg, ["thinker.text.num_hidden_layers=two"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["thinker.text.num_hidden_layers"])
    assert apply_overrides(RuntimeOptions(), ["remat_policy=full"]).jax_remat_policy_name == "nothing_saveable"


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("make, words", [
    (lambda: TextConfig(num_attention_heads=28, num_key_value_heads=5), ["num_key_value_heads", "28", "5"]),
    (lambda: TextConfig(mrope_section=(16, 24, 16)), ["mrope_section", "head_dim"]),
    (lambda: TalkerConfig(head_dim=64), ["mrope_section", "32"]),
    (lambda: AudioEncoderConfig(d_model=1290), ["d_model", "encoder_attention_heads"]),
    (lambda: VisionEncoderConfig(depth=4), ["fullatt_block_indexes", "depth"]),
    (lambda: ThinkerConfig(audio=AudioEncoderConfig(output_dim=2048)), ["audio.output_dim", "2048", "3584"]),
    (lambda: ThinkerConfig(vision=VisionEncoderConfig(out_hidden_size=1280)), ["vision.out_hidden_size"]),
    (lambda: OmniConfig(talker=TalkerConfig(embedding_size=2048)), ["talker.embedding_size", "2048"]),
    (lambda: OmniConfig(talker=None), ["enable_audio_output", "talker"]),
    (lambda: OmniConfig(thinker=None), ["thinker", "null"]),
    (lambda: DiTConfig(num_hidden_layers=4), ["look_ahead_layers"]),
    (lambda: BigVGANConfig(upsample_initial_channel=32), ["upsample_initial_channel", "32"]),
    (lambda: Token2WavConfig(dit=DiTConfig(mel_dim=100)), ["mel_dim", "100", "80"]),
    (lambda: RuntimeOptions(attention_backend="flash"), ["attention_backend", "flash"]),
    (lambda: RuntimeOptions(remat_policy="some"), ["remat_policy"]),
    (lambda: RuntimeOptions(dtype="fp8"), ["dtype", "fp8"]),
])
def test_validation_errors_name_the_field(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_override_validation_error_names_path():
    with pytest.raises(ValueError) as err:
        apply_overrides(OmniConfig(), ["thinker.audio.output_dim=1024"])
    assert "thinker" in str(err.value) and "audio.output_dim (1024)" in str(err.value)
    with pytest.raises(ValueError, match="thinker.text: .*head_dim // 2"):  # derived head_dim 3584 // 32 = 112
        apply_overrides(OmniConfig(), ["thinker.text.num_attention_heads=32"])


def test_configs_are_frozen_and_hashable():
    cfg = OmniConfig.from_yaml(os.path.join(PRESETS, "tiny.yaml"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.thinker.text.hidden_size = 3  # type: ignore[misc]
    assert len({cfg, OmniConfig.from_yaml(os.path.join(PRESETS, "tiny.yaml"))}) == 1
    assert RuntimeOptions() == RuntimeOptions(dtype="float32") and hash(RuntimeOptions())


def test_from_pretrained_and_save(tmp_path):
    d = load_fixture("7b")
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = OmniConfig.from_pretrained(str(tmp_path))
    out_dir = tmp_path / "out"
    cfg.save_pretrained(str(out_dir))
    assert json.loads((out_dir / "config.json").read_text()) == d
    with pytest.raises(FileNotFoundError, match="config.json"):
        OmniConfig.from_pretrained(str(tmp_path / "missing"))
