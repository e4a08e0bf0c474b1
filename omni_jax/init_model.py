"""Randomly initialised checkpoints from a YAML preset (demos and tests; the weights mean nothing)."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import OmniConfig, RuntimeOptions, apply_overrides
from omni_jax.models.thinker import Thinker, init_thinker
from omni_jax.voices import Voice, write_voices

# Speaker-bos ids of the demo voices: the released values are not public (spec §2.3), these are unused ids.
DEMO_VOICES = {"Chelsie": 151870, "Ethan": 151871}


def init_params(config: OmniConfig, seed: int = 0, options: RuntimeOptions | None = None) -> dict:
    """Random params for every sub-model the config has: thinker, and talker + token2wav when enabled."""
    options = options or RuntimeOptions()
    keys = jax.random.split(jax.random.key(seed), 4)
    thinker = Thinker(config.thinker, options)
    params = {"thinker": nn.meta.unbox(jax.jit(lambda rng: init_thinker(thinker, rng))(keys[0]))["params"]}
    if config.talker is None or config.token2wav is None or not config.enable_audio_output:
        return params
    from omni_jax.models.bigvgan import BigVGAN
    from omni_jax.models.dit import DiT
    from omni_jax.models.talker import Talker, init_talker

    talker = Talker(config.talker, options)
    params["talker"] = nn.meta.unbox(jax.jit(lambda rng: init_talker(talker, rng))(keys[1]))["params"]
    dit_cfg, voc_cfg = config.token2wav.dit, config.token2wav.bigvgan
    dit = DiT(dit_cfg, RuntimeOptions())
    x = jnp.zeros((1, 2 * dit_cfg.repeats, dit_cfg.mel_dim))
    dit_vars = jax.jit(lambda rng: dit.init(rng, x, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, dit_cfg.enc_emb_dim)),
                                            jnp.zeros((1, 8, dit_cfg.mel_dim)), jnp.zeros(())))(keys[2])
    vocoder = BigVGAN(voc_cfg)
    voc_vars = jax.jit(lambda rng: vocoder.init(rng, jnp.zeros((1, voc_cfg.mel_dim, 4))))(keys[3])
    params["token2wav"] = {"code2wav_dit_model": nn.meta.unbox(dit_vars)["params"],
                           "code2wav_bigvgan_model": nn.meta.unbox(voc_vars)["params"]}
    return params


def random_voices(config: OmniConfig, seed: int = 0) -> dict[str, Voice]:
    rng = np.random.default_rng(seed)
    dit = config.token2wav.dit
    return {name: Voice(rng.normal(size=(dit.enc_emb_dim,)).astype(np.float32),
                        rng.normal(size=(100, dit.mel_dim)).astype(np.float32) - 5.0, bos)
            for name, bos in DEMO_VOICES.items()}


def init_random_checkpoint(config_yaml: str, out_dir: str, seed: int = 0, overrides=(),
                           write_tokenizer: bool = True) -> str:
    """Write an omni_jax checkpoint dir (config.json, params/, voices, tokenizer files) with random weights."""
    from omni_jax.checkpoint import save_params

    config = apply_overrides(OmniConfig.from_yaml(config_yaml), list(overrides or ()))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf_config(), f, indent=2)
    params = init_params(config, seed)
    save_params(os.path.join(out_dir, "params"), params, overwrite=True)
    speech = "talker" in params
    if speech:
        write_voices(out_dir, random_voices(config, seed))
    with open(os.path.join(out_dir, "omni_jax.json"), "w") as f:
        json.dump({"format_version": 1, "source": f"random init from {config_yaml} (seed {seed})",
                   "thinker_only": not speech}, f, indent=2)
    if write_tokenizer:
        from omni_jax.processing.tokenizer import write_qwen_tokenizer

        write_qwen_tokenizer(out_dir)
    return out_dir
