"""Model configuration: frozen dataclasses for every Qwen2.5-Omni sub-model.

Field names are the HF config keys (see `_config_base` for the few exceptions: sub-configs drop the
`_config` suffix, the rope block is flattened to `rope_theta` / `rope_type` / `mrope_section`). Defaults are
the released Qwen2.5-Omni-7B values, which differ from the HF class defaults for the vision `hidden_size`
(1280, not 3584) and the talker (896 hidden / 24 layers / 12 heads / 4 kv heads / head_dim 128).

    cfg = OmniConfig.from_pretrained("/path/to/Qwen2.5-Omni-7B")   # config.json, either HF layout
    cfg = OmniConfig.from_yaml("configs/models/tiny.yaml")           # partial YAML, same nesting as HF
    cfg = apply_overrides(cfg, ["thinker.text.num_hidden_layers=2"])
    hf_dict = cfg.to_hf_config()                                     # exact round trip of the source
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import yaml

from omni_jax._config_base import HFConfig, apply_overrides, parse_overrides  # noqa: F401 (re-exported)
from omni_jax.kernels.target import PLATFORMS

__all__ = [
    "TextConfig", "AudioEncoderConfig", "VisionEncoderConfig", "ThinkerConfig", "TalkerConfig",
    "DiTConfig", "BigVGANConfig", "Token2WavConfig", "OmniConfig", "RuntimeOptions",
    "apply_overrides", "parse_overrides",
]


def _check(ok: bool, cfg: HFConfig, msg: str) -> None:
    if not ok:
        raise cfg._err(msg)


def _positive(cfg: HFConfig, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, cfg,
               f"{name} must be a positive integer, got {v!r}")


# ------------------------------------------------------------------------------------------ decoders

@dataclass(frozen=True)
class _DecoderConfig(HFConfig):
    """Fields shared by the thinker LM and the talker (both Qwen2-style decoders with M-RoPE)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: Optional[int] = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    rope_theta: float = 1000000.0
    rope_type: str = "default"
    mrope_section: tuple = (16, 24, 24)
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 32768
    max_window_layers: int = 28
    layer_types: Optional[tuple] = None  # None: derived from the sliding-window fields, as in HF
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None

    _ROPE: ClassVar[bool] = True
    _MROPE: ClassVar[bool] = True

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, self,
               f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
               f"num_key_value_heads ({self.num_key_value_heads})")
        _check(self.head_dim % 2 == 0, self, f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        _check(len(self.mrope_section) == 3 and all(isinstance(s, int) and s > 0 for s in self.mrope_section),
               self, f"mrope_section must be 3 positive ints (t, h, w), got {self.mrope_section}")
        _check(sum(self.mrope_section) == self.head_dim // 2, self,
               f"sum(mrope_section) = sum({list(self.mrope_section)}) = {sum(self.mrope_section)} must equal "
               f"head_dim // 2 = {self.head_dim // 2}")
        _check(self.layer_types is None or len(self.layer_types) == self.num_hidden_layers, self,
               f"layer_types has {len(self.layer_types or ())} entries, num_hidden_layers is "
               f"{self.num_hidden_layers}")
        _check(self.rms_norm_eps > 0, self, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")


@dataclass(frozen=True)
class TextConfig(_DecoderConfig):
    """Thinker language model (`thinker_config.text_config`, HF `Qwen2_5OmniTextConfig`).

    HF has no `head_dim` field here: when the dict lacks it, head_dim = hidden_size // num_attention_heads
    and it is not written back. An explicit head_dim is written back (HF attention reads it via getattr).
    """

    model_type: str = "qwen2_5_omni_text"
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None

    _DERIVED_HEAD_DIM: ClassVar[bool] = True


@dataclass(frozen=True)
class TalkerConfig(_DecoderConfig):
    """Talker decoder (`talker_config`, HF `Qwen2_5OmniTalkerConfig`); its head_dim is explicit."""

    model_type: str = "qwen2_5_omni_talker"
    vocab_size: int = 8448
    embedding_size: int = 3584  # thinker hidden size (input of thinker_to_talker_proj)
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    head_dim: Optional[int] = 128
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    tts_codec_start_token_id: int = 8293
    tts_codec_end_token_id: int = 8294
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2

    def validate(self) -> None:
        super().validate()
        _positive(self, "embedding_size")
        for name in ("tts_codec_start_token_id", "tts_codec_end_token_id", "tts_codec_pad_token_id",
                     "tts_codec_mask_token_id"):
            _check(0 <= getattr(self, name) < self.vocab_size, self,
                   f"{name} ({getattr(self, name)}) must be < vocab_size ({self.vocab_size})")


# ------------------------------------------------------------------------------------------ encoders

@dataclass(frozen=True)
class AudioEncoderConfig(HFConfig):
    """Whisper-like audio encoder (`thinker_config.audio_config`, HF `Qwen2_5OmniAudioEncoderConfig`)."""

    model_type: str = "qwen2_5_omni_audio_encoder"
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_function: str = "gelu"
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    initializer_range: float = 0.02
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584

    _ALIASES: ClassVar[dict] = {"num_hidden_layers": "encoder_layers"}  # transformers-4 dumps both

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    def validate(self) -> None:
        _positive(self, "num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                  "d_model", "max_source_positions", "n_window", "output_dim")
        _check(self.d_model % self.encoder_attention_heads == 0, self,
               f"d_model ({self.d_model}) must be divisible by encoder_attention_heads "
               f"({self.encoder_attention_heads})")


@dataclass(frozen=True)
class VisionEncoderConfig(HFConfig):
    """ViT with window attention and 2x2 merger (`thinker_config.vision_config`)."""

    model_type: str = "qwen2_5_omni_vision_encoder"
    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rope_type: str = "axial"

    _ROPE: ClassVar[bool] = True
    _ALIASES: ClassVar[dict] = {"embed_dim": "hidden_size"}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _positive(self, "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size")
        _check(self.hidden_size % self.num_heads == 0, self,
               f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        _check(all(0 <= i < self.depth for i in self.fullatt_block_indexes), self,
               f"fullatt_block_indexes {list(self.fullatt_block_indexes)} must be in [0, depth={self.depth})")
        unit = self.patch_size * self.spatial_merge_size
        _check(self.window_size % unit == 0, self,
               f"window_size ({self.window_size}) must be a multiple of patch_size * spatial_merge_size ({unit})")


@dataclass(frozen=True)
class ThinkerConfig(HFConfig):
    """Thinker (`thinker_config`, HF `Qwen2_5OmniThinkerConfig`): encoders + LM + token ids.

    `vision_start_token_id` is not an HF field, but HF's `get_rope_index` reads it (spec §14.4); the
    released config.json carries it, and we always keep it.
    """

    model_type: str = "qwen2_5_omni_thinker"
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    user_token_id: int = 872
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    eos_token_id: Optional[Any] = 151645
    pad_token_id: Optional[int] = 151643

    _SUBCONFIGS: ClassVar[dict] = {"text": ("text_config", TextConfig),
                                   "audio": ("audio_config", AudioEncoderConfig),
                                   "vision": ("vision_config", VisionEncoderConfig)}

    def validate(self) -> None:
        hidden = self.text.hidden_size
        _check(self.audio.output_dim == hidden, self,
               f"audio.output_dim ({self.audio.output_dim}) must equal text.hidden_size ({hidden})")
        _check(self.vision.out_hidden_size == hidden, self,
               f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal text.hidden_size ({hidden})")
        # Special token ids are not checked against vocab_size: text-only test models use tiny vocabularies
        # (as HF allows); a multimodal input simply cannot be expressed for them.
        _positive(self, "position_id_per_seconds", "seconds_per_chunk")


# ------------------------------------------------------------------------------------------ token2wav

@dataclass(frozen=True)
class DiTConfig(HFConfig):
    """Flow-matching DiT, codec -> mel (`token2wav_config.dit_config`, HF `Qwen2_5OmniDiTConfig`)."""

    model_type: str = "qwen2_5_omni_dit"
    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    ff_mult: int = 2
    emb_dim: int = 512
    head_dim: int = 64
    rope_theta: float = 10000.0
    rope_type: str = "default"
    max_position_embeddings: int = 32768
    block_size: int = 24
    look_ahead_layers: tuple = (10,)
    look_backward_layers: tuple = (0, 20)
    repeats: int = 2
    num_embeds: int = 8193
    mel_dim: int = 80
    dropout: float = 0.1
    enc_emb_dim: int = 192  # speaker vector size in spk_dict.pt
    enc_dim: int = 128
    enc_channels: tuple = (256, 256, 256, 256, 768)
    enc_kernel_sizes: tuple = (5, 3, 3, 3, 1)
    enc_dilations: tuple = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64

    _ROPE: ClassVar[bool] = True
    _ALIASES: ClassVar[dict] = {"dim": "hidden_size", "depth": "num_hidden_layers", "heads": "num_attention_heads"}

    def validate(self) -> None:
        _positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "ff_mult", "emb_dim",
                  "head_dim", "block_size", "repeats", "num_embeds", "mel_dim", "enc_emb_dim", "enc_dim")
        for name in ("look_ahead_layers", "look_backward_layers"):
            _check(all(0 <= i < self.num_hidden_layers for i in getattr(self, name)), self,
                   f"{name} {list(getattr(self, name))} must be in [0, num_hidden_layers={self.num_hidden_layers})")
        n = len(self.enc_channels)
        _check(len(self.enc_kernel_sizes) == n and len(self.enc_dilations) == n, self,
               f"enc_channels, enc_kernel_sizes, enc_dilations must have equal lengths, got "
               f"{n}, {len(self.enc_kernel_sizes)}, {len(self.enc_dilations)}")


@dataclass(frozen=True)
class BigVGANConfig(HFConfig):
    """BigVGAN vocoder, mel -> 24 kHz wave (`token2wav_config.bigvgan_config`)."""

    model_type: str = "qwen2_5_omni_bigvgan"
    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple = (5, 3, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple = (11, 7, 4, 4, 4, 4)

    @property
    def upsample_factor(self) -> int:
        """Output samples per mel frame (240 for the released model)."""
        return math.prod(self.upsample_rates)

    def validate(self) -> None:
        _positive(self, "mel_dim", "upsample_initial_channel")
        _check(len(self.upsample_rates) == len(self.upsample_kernel_sizes), self,
               f"upsample_rates {list(self.upsample_rates)} and upsample_kernel_sizes "
               f"{list(self.upsample_kernel_sizes)} must have equal lengths")
        _check(len(self.resblock_kernel_sizes) == len(self.resblock_dilation_sizes), self,
               "resblock_kernel_sizes and resblock_dilation_sizes must have equal lengths")
        last = self.upsample_initial_channel // 2 ** len(self.upsample_rates)
        _check(last >= 1, self, f"upsample_initial_channel ({self.upsample_initial_channel}) halves "
               f"{len(self.upsample_rates)} times to {last} channels; it must be >= 2**{len(self.upsample_rates)}")


@dataclass(frozen=True)
class Token2WavConfig(HFConfig):
    """Token2Wav = DiT + BigVGAN (`token2wav_config`)."""

    model_type: str = "qwen2_5_omni_token2wav"
    dit: DiTConfig = field(default_factory=DiTConfig)
    bigvgan: BigVGANConfig = field(default_factory=BigVGANConfig)

    _SUBCONFIGS: ClassVar[dict] = {"dit": ("dit_config", DiTConfig), "bigvgan": ("bigvgan_config", BigVGANConfig)}

    def validate(self) -> None:
        _check(self.dit.mel_dim == self.bigvgan.mel_dim, self,
               f"dit.mel_dim ({self.dit.mel_dim}) must equal bigvgan.mel_dim ({self.bigvgan.mel_dim})")


# ------------------------------------------------------------------------------------------ top level

@dataclass(frozen=True)
class OmniConfig(HFConfig):
    """Whole model (`Qwen2_5OmniConfig`). talker/token2wav are None for a thinker-only model."""

    model_type: str = "qwen2_5_omni"
    thinker: ThinkerConfig = field(default_factory=ThinkerConfig)
    talker: Optional[TalkerConfig] = field(default_factory=TalkerConfig)
    token2wav: Optional[Token2WavConfig] = field(default_factory=Token2WavConfig)
    enable_audio_output: bool = True
    # "thinker" when read from a thinker-only config.json (model_type qwen2_5_omni_thinker)
    hf_root: Optional[str] = field(default=None, compare=False, repr=False, kw_only=True)

    _SUBCONFIGS: ClassVar[dict] = {"thinker": ("thinker_config", ThinkerConfig),
                                   "talker": ("talker_config", TalkerConfig),
                                   "token2wav": ("token2wav_config", Token2WavConfig)}
    _NULLABLE: ClassVar[tuple] = ("talker", "token2wav")

    def validate(self) -> None:
        if self.enable_audio_output:
            _check(self.talker is not None and self.token2wav is not None, self,
                   "enable_audio_output is true but talker or token2wav is missing (null)")
        if self.talker is not None:
            text = self.thinker.text
            _check(self.talker.embedding_size == text.hidden_size, self,
                   f"talker.embedding_size ({self.talker.embedding_size}) must equal thinker.text.hidden_size "
                   f"({text.hidden_size})")
            for name in ("tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id"):
                _check(0 <= getattr(self.talker, name) < text.vocab_size, self,
                       f"talker.{name} ({getattr(self.talker, name)}) must be < thinker.text.vocab_size "
                       f"({text.vocab_size})")

    # ---- HF config.json

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> "OmniConfig":
        """From a full (`qwen2_5_omni`) or thinker-only (`qwen2_5_omni_thinker`) HF config dict."""
        if d.get("model_type") == "qwen2_5_omni_thinker":
            return cls(thinker=ThinkerConfig.from_hf_config(d), talker=None, token2wav=None,
                       enable_audio_output=False, hf_root="thinker")
        return super().from_hf_config(d)

    def to_hf_config(self, thinker_only: Optional[bool] = None) -> dict:
        """The HF config dict. thinker_only (default: as read) writes the thinker dict alone."""
        if thinker_only or (thinker_only is None and self.hf_root == "thinker"):
            return self.thinker.to_hf_config()
        return super().to_hf_config()

    @classmethod
    def from_pretrained(cls, path: str) -> "OmniConfig":
        """Read `config.json` from an HF model directory (or a path to the JSON file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: no config.json (expected an HF Qwen2.5-Omni model directory)")
        with open(file) as f:
            return cls.from_hf_config(json.load(f))

    def save_pretrained(self, directory: str) -> str:
        """Write `config.json` (sorted keys, like transformers); returns its path."""
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, "config.json")
        with open(file, "w") as f:
            json.dump(self.to_hf_config(), f, indent=2, sort_keys=True)
            f.write("\n")
        return file

    # ---- YAML presets

    @classmethod
    def from_yaml(cls, path: str) -> "OmniConfig":
        """Read a (possibly partial) YAML preset; missing keys take the defaults (released 7B values)."""
        with open(path) as f:
            data = yaml.safe_load(f)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_yaml(self, path: Optional[str] = None) -> str:
        """Every modelled field as YAML (written to `path` when given); `from_yaml` reads it back."""
        text = yaml.dump(self.to_dict(), Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def replace(self, **dotted_overrides: Any) -> "OmniConfig":
        """`cfg.replace(**{"thinker.text.num_hidden_layers": 2})`; see `apply_overrides`."""
        return apply_overrides(self, dotted_overrides)


class _FlowListDumper(yaml.SafeDumper):
    """YAML dumper writing lists inline ([16, 24, 24]) and mappings as blocks."""


_FlowListDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


# ------------------------------------------------------------------------------------------ runtime

REMAT_POLICIES = {  # name -> jax.checkpoint_policies attribute (None: no jax.checkpoint at all)
    "none": None,                                            # keep every activation (fastest, most memory)
    "full": "nothing_saveable",                              # recompute the whole layer in the backward pass
    "dots": "dots_saveable",                                 # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims": "dots_with_no_batch_dims_saveable",  # keep weight matmuls only (MaxText "minimal")
}
ATTENTION_BACKENDS = ("xla", "cudnn", "pallas")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model (not part of the HF config): dtypes, attention kernel, remat, layer layout.

    scan_layers: the text decoders (thinker LM, talker) as one `nn.scan` over weights stacked on a leading
    "layers" axis (params `.../layers/...`: one compiled layer; training), or unrolled over per-layer modules
    with separate weight arrays (params `.../layers_0/...`, `layers_1`, ...: serving; small-batch decode reads
    separate arrays ~1.8x faster on XLA:CPU, docs/performance.md). Checkpoints always hold the stacked layout;
    `omni_jax.layer_layout.match_layer_layout` converts between the two. The encoders and the DiT are scanned.

    platform: the platform the program is compiled for, which picks every kernel and path
    (`omni_jax.kernels.target`). "auto" is the platform of the mesh's devices (of the first device without a
    mesh), resolved once by the entry points (`OmniModel`, `SpeechModel`, `train.step.Trainer`); "cpu", "gpu" or
    "tpu" names it (e.g. "tpu" for an ahead-of-time TPU compile on a CPU host).
    """

    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_backend: str = "xla"  # xla (CPU/default) | cudnn (GPU) | pallas (TPU splash/flash)
    remat_policy: str = "none"  # see REMAT_POLICIES
    scan_layers: bool = True
    platform: str = "auto"  # auto | cpu | gpu | tpu (see above)

    def __post_init__(self):
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                              ("attention_backend", ATTENTION_BACKENDS), ("remat_policy", tuple(REMAT_POLICIES)),
                              ("platform", PLATFORMS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"RuntimeOptions.{name} = {value!r}; expected one of {list(allowed)}")

    @property
    def jax_remat_policy_name(self) -> Optional[str]:
        """Attribute of `jax.checkpoint_policies` for this remat_policy (None: do not remat)."""
        return REMAT_POLICIES[self.remat_policy]

    def replace(self, **overrides: Any) -> "RuntimeOptions":
        return dataclasses.replace(self, **overrides)
