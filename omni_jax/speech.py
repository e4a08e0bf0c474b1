"""Speech output (spec §8, §10): talker inputs from the thinker's generation, talker decoding, Token2Wav.

Flow for a batch: the thinker generates text keeping, per step, the post-norm hidden state of the token it
was fed. The talker is prefilled with [thinker hidden + merged embeddings of the prompt (placeholders
zeroed); speaker-bos embedding + codec pad; h1 + e1 + codec bos] and then fed one reply element per codec
token: h_k + e_k for k = 2.., then tts_eos, then tts_pad forever. Codes before the first codec end token go
through the DiT (flow matching) and BigVGAN to a 24 kHz waveform.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.generation import DecodeState, record_token
from omni_jax.kernels import target
from omni_jax.models import decode_layout
from omni_jax.models.kv_cache import KVCache
from omni_jax.models.layers import take_rows
from omni_jax.sampling import SamplingParams, seen_mask
from omni_jax.voices import Voice, resolve_voice  # noqa: F401 (re-exported)

SAMPLE_RATE = 24000
MEL_BUCKET = 96  # SpeechModel.mel pads the mel length to a multiple of this (4 DiT blocks; a multiple of repeats)

# Talker sampling defaults of the release (HF `generate`).
TALKER_DEFAULTS = dict(temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, max_new_tokens=4096)


def build_talker_inputs(embed_fn, codec_embed_fn, prompt_ids, prompt_embeds, prompt_hidden, gen_tokens,
                        gen_hidden, num_generated, speaker_bos, *, placeholder_ids: Sequence[int],
                        thinker_eos_ids: Sequence[int], tts_eos: int, tts_pad: int, codec_pad: int, codec_bos: int):
    """Talker prefill embeddings and the reply stream, all in thinker space (width E).

    prompt_ids [B, P]; prompt_embeds / prompt_hidden [B, P, E] (thinker prefill: merged embeddings and post-norm
    hidden states); gen_tokens [B, N] thinker tokens y_1..; gen_hidden [B, N, E] with gen_hidden[:, k-1] = hidden
    at the step fed y_k (valid for k < num_generated); num_generated: [] int (steps the thinker ran);
    speaker_bos [B] int.
    Returns (prefill [B, P+2, E], reply [B, N, E]).
    """
    batch, max_new = gen_tokens.shape
    is_placeholder = jnp.isin(prompt_ids, jnp.asarray(list(placeholder_ids)))
    prefix = prompt_hidden + jnp.where(is_placeholder[..., None], 0.0, prompt_embeds)  # [B, P, E]
    token_embeds = embed_fn(gen_tokens)  # [B, N, E]
    step_states = gen_hidden + token_embeds  # h_k + e_k at index k-1
    bos_row = embed_fn(speaker_bos)[:, None] + codec_embed_fn(jnp.full((1, 1), codec_pad))  # [B, 1, E]
    first_row = step_states[:, :1] + codec_embed_fn(jnp.full((1, 1), codec_bos))
    prefill = jnp.concatenate([prefix, bos_row, first_row], axis=1)

    eos_emb = embed_fn(jnp.full((1, 1), tts_eos))  # [1, 1, E]
    pad_emb = embed_fn(jnp.full((1, 1), tts_pad))
    j = jnp.arange(max_new)[None, :, None]  # reply index
    # R[j] = h_{j+2} + e_{j+2} for j < N-2, then tts_eos at N-2, tts_pad from N-1 on (N = num_generated).
    shifted = jnp.concatenate([step_states[:, 1:], step_states[:, -1:]], axis=1)
    reply = jnp.where(j < num_generated - 2, shifted, jnp.where(j == num_generated - 2, eos_emb, pad_emb))
    # Rows that ended early: tts_eos right after their last real token, pads after (HF's rewrite).
    is_eos = jnp.isin(gen_tokens, jnp.asarray(list(thinker_eos_ids))) & (jnp.arange(max_new)[None] < num_generated)
    first_eos = jnp.min(jnp.where(is_eos, jnp.arange(max_new)[None], num_generated), axis=1)
    first_eos = jnp.clip(first_eos, 1, num_generated - 1)[:, None, None]
    reply = jnp.where(j >= first_eos, pad_emb, reply)
    reply = jnp.where(j == first_eos - 1, eos_emb, reply)
    return prefill, reply


def talker_decode(apply_fn, codec_embed_fn, params, state: DecodeState, reply: jax.Array, num_steps: int,
                  eos_ids, pad_id: int, suppress_tokens: Sequence[int], platform: str = "auto") -> DecodeState:
    """Up to `num_steps` talker steps on device: input = codec_embed(last code) + reply[step - 1]; `platform` is
    the program's target (omni_jax.kernels.target)."""
    limit = jnp.minimum(state.step + num_steps, state.tokens.shape[1])

    def cond(s):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s):
        # take_rows, not a slice of the loop-invariant bf16 reply: XLA:CPU would hoist a float32 copy of it out of
        # the loop. Its index clip keeps the last element once the reply is used up.
        element = take_rows(reply, (s.step - 1)[None], axis=1, platform=platform)  # [B, 1, E]
        embeds = codec_embed_fn(params, s.last_token[:, None]) + element  # [B, 1, E]
        positions = jnp.broadcast_to(s.position[None, :, None], (3, embeds.shape[0], 1))
        out = apply_fn(params, embeds, positions, jnp.ones(embeds.shape[:2], jnp.int32), s.cache)
        s = s.replace(cache=out.cache, position=s.position + 1)
        return record_token(s, out.logits[:, -1], eos_ids, pad_id, suppress_tokens)

    return jax.lax.while_loop(cond, body, state)


@flax.struct.dataclass
class TalkerJob:
    """Device inputs of one talker run."""

    prefill: jax.Array  # [B, P+2, E]
    reply: jax.Array  # [B, N, E]
    positions: jax.Array  # [3, B, P+2]
    segment_ids: jax.Array  # [B, P+2]
    first_position: jax.Array  # [B]
    seen_ids: jax.Array  # [B, P+2] talker input ids (mask/pad/bos codes) for the repetition penalty


def make_talker_fns(apply_fn, codec_embed_fn, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                    vocab_size: int, suppress_tokens: Sequence[int], platform: str = "auto"):
    """Jitted (prefill, decode) for the talker in a program for `platform`; the cache and state are donated."""
    eos = np.asarray(list(eos_ids), np.int32)  # numpy: a constant of the program, placed on no device

    @partial(jax.jit, donate_argnums=(2,))
    def prefill_fn(params, job: TalkerJob, cache: KVCache, key, sampling: SamplingParams):
        out = apply_fn(params, job.prefill, job.positions, job.segment_ids, cache)
        batch = job.prefill.shape[0]
        state = DecodeState(
            cache=out.cache, last_token=jnp.zeros((batch,), jnp.int32), position=job.first_position,
            tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32), step=jnp.zeros((), jnp.int32),
            done=jnp.zeros((batch,), bool), key=key, sampling=sampling,
            seen=seen_mask(job.seen_ids, vocab_size), hidden=None,
        )
        return record_token(state, out.logits[:, -1], eos, pad_id, suppress_tokens)

    @partial(jax.jit, static_argnums=(3,), donate_argnums=(1,))
    def decode_fn(params, state, reply, num_steps):
        return talker_decode(apply_fn, codec_embed_fn, params, state, reply, num_steps, eos, pad_id,
                             suppress_tokens, platform)

    return prefill_fn, decode_fn


def talker_suppressed_tokens(cfg, num_dit_codes: int, eos_ids: Sequence[int]) -> tuple[int, ...]:
    """Codec ids the talker may not emit: the codec bos (as HF) and, beyond HF, every id the DiT has no
    embedding for (>= num_dit_codes) except the end tokens. A trained talker never picks those; HF would crash
    in Token2Wav if it did (index out of range), so masking them changes no run that HF completes."""
    invalid = [i for i in range(num_dit_codes, cfg.vocab_size) if i not in eos_ids]
    return tuple(sorted({cfg.tts_codec_start_token_id, *invalid}))


@partial(jax.jit, static_argnames=("num_frames", "mel_dim", "block_size"))
def position_noise(key: jax.Array, start, *, num_frames: int, mel_dim: int, block_size: int) -> jax.Array:
    """Flow-matching start noise for mel frames [start, start + num_frames): [num_frames, mel_dim] float32.

    Each DiT block b (frames [b·bs, (b+1)·bs)) draws N(0, 1) from fold_in(key, b), so a frame's noise depends on
    its position only, not on the utterance length or on how it is chunked: streamed and whole-utterance
    synthesis start from the same state (`streaming.py`)."""
    first = start // block_size
    num_blocks = num_frames // block_size + 2  # enough blocks for any start offset
    blocks = first + jnp.arange(num_blocks)
    noise = jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(key, b), (block_size, mel_dim)))(blocks)
    noise = noise.reshape(num_blocks * block_size, mel_dim)
    return jax.lax.dynamic_slice_in_dim(noise, start - first * block_size, num_frames, axis=0)


def codes_before_end(tokens: np.ndarray, end_ids: Sequence[int]) -> list[np.ndarray]:
    """Per row, the codec tokens before the first end token (8292 pad or 8294 eos in the release)."""
    out = []
    for row in np.asarray(tokens):
        ends = np.nonzero(np.isin(row, list(end_ids)))[0]
        out.append(row[: ends[0]] if len(ends) else row)
    return out


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("num_steps", "guidance_scale", "sway_coefficient"))
def sample_masked_mel(dit_config, dit_options, params, codes, cond, ref_mel, noise, frame_mask, *, num_steps: int = 10,
                      guidance_scale: float = 0.5, sway_coefficient: float | None = -1.0) -> jax.Array:
    """The flow-matching ODE on padded lengths: codes [B, W/r], cond [B, enc_emb_dim], ref_mel [B, T_ref, mel],
    noise [B, W, mel], frame_mask [B, W] (1 = real frame) -> mel [B, mel, W] (padded frames are garbage).

    `flow_matching.sample_mel` jitted on the (hashable) DiT config and options, so whole-utterance synthesis,
    streams and models with equal configs share compiles."""
    from omni_jax.models.dit import DiT
    from omni_jax.models.flow_matching import sample_mel

    return sample_mel(DiT(dit_config, dit_options).apply, params, codes, cond, ref_mel, noise, num_steps=num_steps,
                      guidance_scale=guidance_scale, sway_coefficient=sway_coefficient, frame_mask=frame_mask)


@partial(jax.jit, static_argnums=(0, 1))
def _vocode(config, platform: str, params, mel: jax.Array) -> jax.Array:
    """BigVGAN on mel [B, mel, T] in a program for `platform`; jitted on the (hashable) config, so models with
    equal configs share compiles."""
    from omni_jax.models.bigvgan import BigVGAN

    return BigVGAN(config, platform=platform).apply({"params": params}, mel)


def check_codes(codes: np.ndarray, num_embeds: int, what: str = "codec ids") -> None:
    """Codes the DiT can embed are [0, num_embeds); anything else (e.g. a talker end token) is an error."""
    codes = np.asarray(codes)
    bad = np.nonzero((codes < 0) | (codes >= num_embeds))[0]
    if len(bad):
        raise ValueError(f"{what} must be in [0, {num_embeds}) (cut the talker output at its end token); "
                         f"got {int(codes[bad[0]])} at position {int(bad[0])}")


class SpeechModel:
    """The talker and Token2Wav (DiT + BigVGAN) with their params, voices and jitted entry points."""

    def __init__(self, config, params: Mapping, options, speakers: Mapping[str, Voice]):
        from omni_jax.config import RuntimeOptions
        from omni_jax.models.bigvgan import BigVGAN
        from omni_jax.models.dit import DiT
        from omni_jax.layer_layout import match_layer_layout
        from omni_jax.models.talker import Talker, init_talker

        self.config = config
        self.speakers = dict(speakers)
        # the program's target, resolved once ("auto": the first device's platform; OmniModel passes it resolved)
        self.options = options = options.replace(platform=target.resolve_platform(options))
        self.talker = Talker(config.talker, options)
        # Token2Wav runs in float32, as the reference does.
        self.dit = DiT(config.token2wav.dit, RuntimeOptions(attention_backend=options.attention_backend,
                                                            platform=options.platform))
        self.bigvgan = BigVGAN(config.token2wav.bigvgan, platform=options.platform)
        # Held in options.param_dtype (e.g. bfloat16 for serving: half the bytes each decode step reads).
        talker_dtype = jnp.dtype(options.param_dtype)
        wanted = jax.eval_shape(lambda: init_talker(self.talker, jax.random.key(0)))["params"]
        talker_params = match_layer_layout(params["talker"], nn.meta.unbox(wanted))  # stacked or per-layer
        self.talker_params = jax.tree_util.tree_map(
            lambda x: jnp.asarray(x, talker_dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
            talker_params)
        if decode_layout.applies(options.platform):  # the talker's projections as the CPU decode kernel reads them
            self.talker_params = decode_layout.to_decode_layout(
                self.talker_params, decode_layout.projection_equations(lambda: init_talker(self.talker,
                                                                                           jax.random.key(0))))
        t2w = params["token2wav"]
        self.dit_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t2w["code2wav_dit_model"])
        self.bigvgan_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                                                     t2w["code2wav_bigvgan_model"])
        self._talker_fns: dict = {}
        self._wave_fn = partial(_vocode, config.token2wav.bigvgan, options.platform)

    # ------------------------------------------------------------------ talker
    def talker_apply(self, params, embeds, positions, segment_ids, cache):
        return self.talker.apply({"params": params}, embeds, positions, segment_ids, cache, last_logits_only=True)

    def codec_embed(self, params, codes):
        from omni_jax.models.talker import Talker

        return self.talker.apply({"params": params}, codes, method=Talker.embed_codec)

    def talker_fns(self, max_new_tokens: int, eos_ids: tuple, use_penalty: bool):
        key = (max_new_tokens, eos_ids, use_penalty)
        if key not in self._talker_fns:
            cfg = self.config.talker
            params_embed = lambda p, c: self.codec_embed(p, c)  # noqa: E731
            self._talker_fns[key] = make_talker_fns(
                self.talker_apply, params_embed, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                pad_id=cfg.tts_codec_pad_token_id, vocab_size=cfg.vocab_size,
                suppress_tokens=talker_suppressed_tokens(cfg, self.config.token2wav.dit.num_embeds, eos_ids),
                platform=self.options.platform)
        return self._talker_fns[key]

    # ------------------------------------------------------------------ token2wav
    def mel(self, codes: np.ndarray, voice: Voice, noise: Optional[np.ndarray] = None, seed: int = 0,
            num_steps: int = 10, guidance_scale: float = 0.5, sway_coefficient: float = -1.0) -> np.ndarray:
        """Codec ids [n] -> log-mel [mel, 2n] by flow matching from `noise` [2n, mel] (if None: `position_noise`
        from `seed`, the noise streaming uses too)."""
        dit_cfg = self.config.token2wav.dit
        codes = np.asarray(codes, np.int32).reshape(1, -1)
        n = codes.shape[1]
        if n == 0:
            raise ValueError("token2wav needs at least one codec token")
        check_codes(codes[0], dit_cfg.num_embeds)
        frames = dit_cfg.repeats * n
        if noise is None:
            noise = position_noise(jax.random.key(seed), 0, num_frames=frames, mel_dim=dit_cfg.mel_dim,
                                   block_size=dit_cfg.block_size)
        if np.shape(noise) not in ((frames, dit_cfg.mel_dim), (1, frames, dit_cfg.mel_dim)):
            raise ValueError(f"noise must be [{frames}, {dit_cfg.mel_dim}] for {n} codec tokens, got {np.shape(noise)}")
        noise = jnp.asarray(noise, jnp.float32).reshape(1, frames, dit_cfg.mel_dim)
        # Length bucket (one compile per MEL_BUCKET frames): pad with code 0 / zero noise, mask the pad out.
        bucket = -(-frames // MEL_BUCKET) * MEL_BUCKET
        codes = np.pad(codes, ((0, 0), (0, (bucket - frames) // dit_cfg.repeats)))
        noise = jnp.pad(noise, ((0, 0), (0, bucket - frames), (0, 0)))
        frame_mask = jnp.asarray((np.arange(bucket) < frames)[None], jnp.int32)
        cond = jnp.asarray(voice.cond, jnp.float32).reshape(1, -1)
        ref = jnp.asarray(voice.ref_mel, jnp.float32).reshape(1, -1, dit_cfg.mel_dim)
        mel = sample_masked_mel(dit_cfg, self.dit.options, {"params": self.dit_params}, jnp.asarray(codes), cond, ref,
                                noise, frame_mask, num_steps=num_steps, guidance_scale=guidance_scale,
                                sway_coefficient=sway_coefficient)
        return np.asarray(mel)[0, :, :frames]

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """log-mel [mel, T] -> 24 kHz waveform [T * 240] float32."""
        return np.asarray(self._wave_fn(self.bigvgan_params, jnp.asarray(mel, jnp.float32)[None]))[0]

    def token2wav(self, codes, voice: Voice, noise=None, seed: int = 0, **mel_kwargs) -> np.ndarray:
        return self.vocode(self.mel(codes, voice, noise=noise, seed=seed, **mel_kwargs))
