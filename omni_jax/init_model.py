"""Randomly initialised checkpoints from a YAML preset (demos and tests; the weights mean nothing)."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax

from omni_jax.config import OmniConfig, RuntimeOptions, apply_overrides
from omni_jax.models.thinker import Thinker, init_thinker


def init_params(config: OmniConfig, seed: int = 0, options: RuntimeOptions | None = None) -> dict:
    """Random params for every module this build has, as {"thinker": {...}} (numpy-convertible arrays)."""
    options = options or RuntimeOptions()
    thinker = Thinker(config.thinker, options)
    variables = jax.jit(lambda rng: init_thinker(thinker, rng))(jax.random.key(seed))
    return {"thinker": nn.meta.unbox(variables)["params"]}


def init_random_checkpoint(config_yaml: str, out_dir: str, seed: int = 0, overrides=(),
                           write_tokenizer: bool = True) -> str:
    """Write an omni_jax checkpoint dir (config.json, params/, tokenizer files) with random weights."""
    from omni_jax.checkpoint import save_params

    config = apply_overrides(OmniConfig.from_yaml(config_yaml), list(overrides or ()))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf_config(), f, indent=2)
    save_params(os.path.join(out_dir, "params"), init_params(config, seed))
    with open(os.path.join(out_dir, "omni_jax.json"), "w") as f:
        json.dump({"format_version": 1, "source": f"random init from {config_yaml} (seed {seed})",
                   "thinker_only": True}, f, indent=2)
    if write_tokenizer:
        from omni_jax.processing.tokenizer import write_qwen_tokenizer

        write_qwen_tokenizer(out_dir)
    return out_dir
