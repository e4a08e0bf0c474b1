"""A serving preset (configs/serve/*.yaml): the model, its dtypes and attention kernel, the mesh of a slice, and
the shapes of every serving program on it (prefill, decode, talker decode, Token2Wav).

    model:
      config: configs/models/qwen2_5_omni_7b.yaml   # model preset YAML
      overrides: []                                 # KEY=VALUE model config overrides
      dtype: bfloat16                               # weights and compute
      attention_backend: pallas
    mesh: {data: 1, fsdp: 2, tensor: 4}
    jobs:                                           # omni-jax compile --job NAME --serve-config THIS
      prefill: {batch: 8, seq_len: 8192, max_len: 8448}
      decode: {batch: 64, seq_len: 8064, max_len: 8192}
      paged-decode: {batch: 256, seq_len: 2048, max_len: 8192, page_size: 64}   # slots, mean tokens per slot
      talker-decode: {batch: 64, seq_len: 8194, max_len: 10240}
      token2wav: {batch: 64}
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import yaml

SERVING_JOBS = ("prefill", "decode", "paged-decode", "talker-decode", "token2wav")
_SHAPE_KEYS = ("batch", "seq_len", "max_len", "page_size")


@dataclasses.dataclass(frozen=True)
class ServePreset:
    model_config: str
    overrides: tuple = ()
    dtype: str = "bfloat16"
    attention_backend: str = "pallas"
    mesh: Mapping[str, int] = dataclasses.field(default_factory=dict)
    jobs: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str) -> "ServePreset":
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        unknown = set(raw) - {"model", "mesh", "jobs"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected model, mesh, jobs")
        model = dict(raw.get("model") or {})
        if "config" not in model:
            raise ValueError(f"{path}: model.config (a model preset YAML) is required")
        bad = set(model) - {"config", "overrides", "dtype", "attention_backend"}
        if bad:
            raise ValueError(f"{path}: unknown model keys {sorted(bad)}")
        jobs = {}
        for job, shape in (raw.get("jobs") or {}).items():
            if job not in SERVING_JOBS:
                raise ValueError(f"{path}: jobs.{job}: unknown job; expected one of {', '.join(SERVING_JOBS)}")
            extra = set(shape or {}) - set(_SHAPE_KEYS)
            if extra:
                raise ValueError(f"{path}: jobs.{job}: unknown keys {sorted(extra)}; expected {', '.join(_SHAPE_KEYS)}")
            jobs[job] = {k: int(v) for k, v in (shape or {}).items()}
        return cls(model_config=model["config"], overrides=tuple(model.get("overrides") or ()),
                   dtype=model.get("dtype", "bfloat16"), attention_backend=model.get("attention_backend", "pallas"),
                   mesh={k: int(v) for k, v in (raw.get("mesh") or {}).items()}, jobs=jobs)

    def shape(self, job: str) -> dict:
        """{batch, seq_len, max_len} (those given) of a serving job; an error when the preset has no such job."""
        if job not in self.jobs:
            raise ValueError(f"the serving preset has no shapes for job {job!r} (it has: "
                             f"{', '.join(self.jobs) or 'none'})")
        return dict(self.jobs[job])
