"""Converter rows for the speech side: talker (spec §8) and token2wav (DiT + BigVGAN, §9), as `hf_mapping.Rule`s.

The DiT and BigVGAN modules describe their own HF weight tables (`dit.weight_table`, `bigvgan.hf_param_table`);
this file turns those descriptions into converter rows under `token2wav/code2wav_dit_model/` and
`token2wav/code2wav_bigvgan_model/`.
"""
from __future__ import annotations

from omni_jax.config import OmniConfig, TalkerConfig, Token2WavConfig
from omni_jax.hf_mapping import (
    CONV1D,
    CONV_TRANSPOSE1D,
    IDENTITY,
    LINEAR,
    Rule,
    _attn_in,
    _attn_out,
    _linear,
    _norm,
    merge_heads_in,
    split_heads_bias,
    split_heads_out,
)
from omni_jax.models import bigvgan as bigvgan_lib
from omni_jax.models import dit as dit_lib

DIT_HF = "token2wav.code2wav_dit_model."
DIT_OURS = "token2wav/code2wav_dit_model/"
BIGVGAN_HF = "token2wav.code2wav_bigvgan_model."
BIGVGAN_OURS = "token2wav/code2wav_bigvgan_model/"


def talker_rules(cfg: TalkerConfig) -> list[Rule]:
    """talker.* -> talker/{thinker_to_talker_proj, embed_tokens, decoder, codec_head}."""
    E, D, V, F, L = cfg.embedding_size, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_hidden_layers
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows = _linear("talker.thinker_to_talker_proj", "talker/thinker_to_talker_proj", E, D, True)
    rows.append(Rule("talker.model.embed_tokens.weight", "talker/embed_tokens/embedding", (V, E)))
    p, o = "talker.model.layers.{i}.", "talker/decoder/layers/"
    rows += _norm(p + "input_layernorm", o + "input_layernorm", D, layers=L)
    rows += _attn_in(p + "self_attn.q_proj", o + "self_attn/q_proj", D, H, hd, True, L)
    rows += _attn_in(p + "self_attn.k_proj", o + "self_attn/k_proj", D, K, hd, True, L)
    rows += _attn_in(p + "self_attn.v_proj", o + "self_attn/v_proj", D, K, hd, True, L)
    rows += _attn_out(p + "self_attn.o_proj", o + "self_attn/o_proj", D, H, hd, False, L)
    rows += _norm(p + "post_attention_layernorm", o + "post_attention_layernorm", D, layers=L)
    rows += _linear(p + "mlp.gate_proj", o + "mlp/gate_proj", D, F, False, L)
    rows += _linear(p + "mlp.up_proj", o + "mlp/up_proj", D, F, False, L)
    rows += _linear(p + "mlp.down_proj", o + "mlp/down_proj", F, D, False, L)
    rows += _norm("talker.model.norm", "talker/decoder/norm", D)
    rows.append(Rule("talker.codec_head.weight", "talker/codec_head/kernel", (V, D), LINEAR))
    return rows


def _dit_transform(row: "dit_lib.WeightRow"):
    kind = row.kind
    if kind == "identity":
        return IDENTITY
    if kind == "linear":
        return LINEAR
    if kind == "conv1d":
        return CONV1D
    if kind in ("heads_out", "chunks_out"):
        return split_heads_out(row.split, row.hf_shape[0] // row.split)
    if kind in ("heads_bias", "chunks_bias"):
        return split_heads_bias(row.split, row.hf_shape[0] // row.split)
    if kind == "heads_in":
        return merge_heads_in(row.split, row.hf_shape[1] // row.split)
    raise ValueError(f"unknown DiT weight layout {kind!r} for {row.hf}")


_BIGVGAN_KINDS = {"identity": IDENTITY, "conv1d": CONV1D, "conv_transpose1d": CONV_TRANSPOSE1D}


def token2wav_rules(cfg: Token2WavConfig) -> list[Rule]:
    rows = [Rule(DIT_HF + r.hf, DIT_OURS + r.ours, tuple(r.hf_shape), _dit_transform(r), r.layers)
            for r in dit_lib.weight_table(cfg.dit)]
    for hf, ours, shape, kind in bigvgan_lib.hf_param_table(cfg.bigvgan):
        rows.append(Rule(BIGVGAN_HF + hf, BIGVGAN_OURS + "/".join(ours), tuple(shape), _BIGVGAN_KINDS[kind]))
    return rows


def speech_rules(config: OmniConfig) -> list[Rule]:
    """All talker and token2wav rows of a full checkpoint (empty when it has no talker)."""
    if config.talker is None or config.token2wav is None:
        return []
    return talker_rules(config.talker) + token2wav_rules(config.token2wav)
