"""Train run configuration: a YAML file -> frozen dataclasses, with `section.key=value` overrides.

    cfg = TrainConfig.from_yaml("configs/train/toy.yaml", ["optim.learning_rate=1e-3", "train.steps=50"])

Unknown keys are errors (naming the key and the file), so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

FREEZABLE = ("audio_encoder", "vision_encoder", "thinker_lm", "talker")


@dataclass(frozen=True)
class ModelSection:
    config: str = "configs/models/tiny.yaml"  # model preset YAML (random init) ...
    init_from: Optional[str] = None  # ... or an omni_jax checkpoint dir / HF dir to start from
    overrides: tuple = ()  # model config overrides, e.g. ["thinker_config.text_config.num_hidden_layers=4"]
    seed: int = 0  # random-init seed
    dtype: str = "float32"  # compute dtype (bfloat16: bf16 matmuls on f32 master weights)
    param_dtype: str = "float32"  # master weights (keep float32 for training)
    remat_policy: str = "none"  # see omni_jax.config.REMAT_POLICIES
    attention_backend: str = "xla"


@dataclass(frozen=True)
class DataSection:
    """Loop-side data keys; every other key of the YAML `data:` section is passed to the pipeline
    (omni_jax.data.pipeline.DataConfig: data_dir, config, jsonl, packing, shuffle_seed, cache_samples, ...)."""

    dataset: str = "omni_toy"  # omni_toy | conversation_jsonl (omni_jax.data) | synthetic_count (train/)
    split: str = "train"
    eval_split: str = "validation"
    seq_len: int = 256  # L of every row
    talker_seq_len: int = 0  # Lt of every talker row (talker loss only); 0 = seq_len + 32
    batch_size: int = 8  # global rows per optimizer step (all hosts, all microbatches)
    grad_accum: int = 1  # microbatches per step (lax.scan); batch_size % (grad_accum * processes) == 0
    # fixed encoder input sizes (train.batches.stack_microbatches): {audio_chunks, image_patches, video_patches}
    media_buckets: Mapping[str, int] = field(default_factory=dict)
    pipeline: Mapping[str, Any] = field(default_factory=dict)  # the other keys, for the pipeline

    def pipeline_config(self, split: Optional[str] = None) -> dict:
        return {"dataset": self.dataset, "split": split or self.split, **dict(self.pipeline)}

    @property
    def talker_length(self) -> int:
        return self.talker_seq_len or self.seq_len + 32


@dataclass(frozen=True)
class OptimSection:
    learning_rate: float = 1e-3  # peak
    warmup_steps: int = 10
    end_lr_ratio: float = 0.1  # cosine decays to learning_rate * end_lr_ratio at train.steps
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping (<= 0: off)


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # K consecutive NaN/inf steps stop the run
    freeze: tuple = ()  # any of FREEZABLE
    progress: bool = True  # tqdm bar
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end
    export_on_finish: bool = True  # write WORKDIR/final (an omni_jax checkpoint dir: generate / export)
    max_loss_tokens: int = 0  # > 0: lm_head only at the loss positions, at most this many per microbatch
    loss_chunk: int = 0  # > 0: lm_head + cross-entropy fused over chunks of this many tokens (no [N, V] logits)
    peak_flops: float = 0.0  # per device, for MFU; 0 = measure a matmul at start
    # Talker codec loss (needs a model with a talker and data with codec targets: omni_toy). loss = thinker
    # loss + talker_loss_weight * talker loss; 0 = train the thinker only (the talker is exported untouched).
    talker_loss_weight: float = 0.0
    talker_thinker_grad: bool = False  # let the talker loss reach the thinker through H/E (else stop_gradient)
    talker_speaker: str = "Chelsie"  # voice whose speaker bos starts the talker ("" = the first voice)


@dataclass(frozen=True)
class EvalSection:
    num_batches: int = 2  # eval-loss batches
    num_examples: int = 32  # generation-accuracy examples (0: skip)
    max_new_tokens: int = 8
    batch_size: int = 8  # generation batch


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    mesh: Mapping[str, int] = field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})

    def validate(self) -> "TrainConfig":
        bad = [f for f in self.train.freeze if f not in FREEZABLE]
        if bad:
            raise ValueError(f"train.freeze: unknown modules {bad}; expected any of {list(FREEZABLE)}")
        if self.data.batch_size % self.data.grad_accum:
            raise ValueError(f"data.batch_size {self.data.batch_size} is not divisible by data.grad_accum "
                             f"{self.data.grad_accum}")
        for name in ("steps", "seq_len"):
            section = self.train if name == "steps" else self.data
            if getattr(section, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(section, name)}")
        if self.train.talker_loss_weight < 0:
            raise ValueError(f"train.talker_loss_weight must be >= 0, got {self.train.talker_loss_weight}")
        if self.train.loss_chunk < 0:
            raise ValueError(f"train.loss_chunk must be >= 0, got {self.train.loss_chunk}")
        if self.data.talker_seq_len < 0:
            raise ValueError(f"data.talker_seq_len must be >= 0, got {self.data.talker_seq_len}")
        unknown = set(self.mesh) - {"data", "fsdp", "tensor"}
        if unknown:
            raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected data, fsdp, tensor")
        return self

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        raw = dict(raw or {})
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw.pop(f.name)
            if f.name == "mesh":
                kwargs["mesh"] = {str(k): int(v) for k, v in dict(value or {}).items()}
                continue
            if f.name == "data":  # keys the loop does not know go to the pipeline
                value = dict(value or {})
                known = {x.name for x in dataclasses.fields(DataSection)} - {"pipeline"}
                bad = set(value.get("media_buckets") or {}) - {"audio_chunks", "image_patches", "video_patches"}
                if bad:
                    raise ValueError(f"{where}: data.media_buckets: unknown keys {sorted(bad)}; expected "
                                     "audio_chunks, image_patches, video_patches")
                value = {**{k: v for k, v in value.items() if k in known},
                         "pipeline": {k: v for k, v in value.items() if k not in known}}
            section_cls = type(f.default_factory())
            kwargs[f.name] = _section(section_cls, value or {}, f"{where}: {f.name}")
        if raw:
            raise ValueError(f"{where}: unknown sections {sorted(raw)}; expected "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**kwargs).validate()

    @classmethod
    def from_yaml(cls, path: str, overrides: Sequence[str] = ()) -> "TrainConfig":
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        return cls.from_dict(apply_overrides(raw, overrides), where=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section(section_cls, values: Mapping[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected {sorted(names)}")
    out = {}
    for key, value in values.items():
        default = names[key].default
        if key in ("pipeline", "media_buckets"):
            value = dict(value or {})
        elif isinstance(default, tuple) or key in ("overrides", "freeze"):
            value = tuple(value or ())
        elif isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                value = float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
        elif isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
        out[key] = value
    return section_cls(**out)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """`a.b=value` strings (value parsed as YAML: numbers, true/false, [lists]) into a nested dict copy."""
    import copy

    raw = copy.deepcopy(dict(raw))
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw
