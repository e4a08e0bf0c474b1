"""Tiny random HF transformers Qwen2.5-Omni models, built inside the tests (the numerical oracle)."""
from __future__ import annotations

import math

import numpy as np
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

VISION_START = 151652


def thinker_config(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, ffn=96, vocab=151936,
                   mrope_section=(2, 3, 3), rope_theta=1e6, **extra) -> Qwen2_5OmniThinkerConfig:
    """A tiny thinker config. head_dim=None means hidden // heads (as the release)."""
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                 "mrope_section": list(mrope_section)})
    if head_dim is not None:
        text["head_dim"] = head_dim
    return Qwen2_5OmniThinkerConfig(
        text_config=text,
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          output_dim=hidden, num_mel_bins=128, n_window=100, max_source_positions=1500),
        vision_config=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=hidden,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        vision_start_token_id=VISION_START,
        **extra,
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter so activations and logits are O(1) (HF's init gives near-zero logits, which
    would make an absolute tolerance meaningless): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm
    weights ~ 1 + N(0, 0.1^2), embeddings ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name or "ln_" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            elif "embed_tokens" in name or p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def build_thinker(seed: int = 0, **config_kwargs) -> Qwen2_5OmniThinkerForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(**config_kwargs))
    return randomize_(model, seed).eval()


def left_padded_batch(rng: np.random.Generator, lengths, vocab: int, pad_id: int = 0, low: int = 1):
    """Random ids [B, max(lengths)] with left padding and the matching attention mask."""
    total = max(lengths)
    ids = np.full((len(lengths), total), pad_id, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(low, vocab, n)
        mask[row, total - n:] = 1
    return ids, mask


def randomize_dit_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """DiT weights ~ N(0, 1/fan_in) (AdaLN linears included, which HF may init to zero), biases ~ N(0, 0.1²),
    the codec table ~ N(0, 1): activations and velocities are O(1) (so an absolute tolerance means something)
    and attention across blocks matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "codec_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(int(np.prod(p.shape[1:]))))
    return model


def randomize_bigvgan_(model: torch.nn.Module, seed: int = 0, gain: float = 0.8) -> torch.nn.Module:
    """BigVGAN weights that keep the waveform mostly inside (-1, 1): conv weights ~ gain·N(0, 1/fan_in) (1.0 makes
    the residual stream grow ~x2 per stage and the output is mostly clamped), conv_post another x0.5, biases and
    log-alpha/log-beta ~ N(0, 0.1^2). Works on the vocoder alone or on `model.code2wav_bigvgan_model`."""
    gen = torch.Generator().manual_seed(seed)
    rates = model.config.upsample_rates
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("alpha", "beta", "bias")):
                p.copy_(noise * 0.1)
            elif name.startswith("ups."):  # [in, out, k]: each output sample sees in·k/r taps
                p.copy_(noise * gain / math.sqrt(p.shape[0] * p.shape[2] / rates[int(name.split(".")[1])]))
            else:  # Conv1d [out, in, k]
                scale = 0.5 if name.startswith("conv_post") else 1.0
                p.copy_(noise * gain * scale / math.sqrt(p.shape[1] * p.shape[2]))
    return model
