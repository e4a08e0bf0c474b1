"""The public Python API: `OmniModel.from_pretrained(path)`, `thinker_logits(batch)`, `generate(batch)`."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import generation
from omni_jax.config import OmniConfig, RuntimeOptions
from omni_jax.kernels import target
from omni_jax.layer_layout import match_layer_layout
from omni_jax.models import decode_layout
from omni_jax.models.kv_cache import KVCache
from omni_jax.model_inputs import ThinkerInputs, prepare_thinker_inputs
from omni_jax.models.thinker import Thinker, init_thinker
from omni_jax.processing.tmrope import rope_index
from omni_jax.sampling import SamplingParams
from omni_jax.speech import TALKER_DEFAULTS, SpeechModel, TalkerJob, build_talker_inputs, codes_before_end
from omni_jax.voices import Voice, read_voices, resolve_voice
from omni_jax.sharding import batch_sharding, logical_shardings, make_mesh, rules_context

log = logging.getLogger(__name__)

@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # [B, L + N] prompt (as given, left padded) followed by the generated tokens
    generated: list[np.ndarray]  # per row: generated ids up to and including the first end token
    text: list[Optional[str]]  # decoded generated text per row (None without a tokenizer)
    codec_tokens: list[Optional[np.ndarray]]  # talker codes per row (None where no speech was asked for)
    audio: list[Optional[np.ndarray]]  # 24 kHz float32 waveform per row (None where no speech was asked for)


def _to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host sharded) array as numpy on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _is_converted_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "omni_jax.json"))


class OmniModel:
    """Qwen2.5-Omni in JAX: config, params (optionally sharded on a mesh) and jitted entry points."""

    def __init__(self, config: OmniConfig, params: Mapping[str, Any], options: RuntimeOptions | None = None,
                 mesh: jax.sharding.Mesh | None = None, tokenizer=None, speakers: Mapping[str, Voice] | None = None):
        self.config = config
        options = options or RuntimeOptions()
        # the program's target, resolved once: "auto" is the platform of the mesh's devices (or the first device's)
        self.options = options.replace(platform=target.resolve_platform(options, mesh))
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.thinker = Thinker(config.thinker, self.options)
        thinker_params = self._thinker_subtree(params["thinker"])
        dtype = jnp.dtype(self.options.param_dtype)
        thinker_params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype)
                                                if np.asarray(x).dtype != dtype else x, thinker_params)
        if mesh is not None:
            shardings = self.thinker_param_shardings(mesh)
            thinker_params = jax.device_put(thinker_params, shardings)
        else:
            thinker_params = jax.device_put(thinker_params)
            if decode_layout.applies(self.options.platform):  # the LM's projections as the CPU decode kernel reads them
                thinker_params = decode_layout.to_decode_layout(
                    thinker_params, decode_layout.projection_equations(self._init_thinker_abstract),
                    prefixes=(("decoder",), ("lm_head",)))
        self.params = {"thinker": thinker_params}
        self.speech: SpeechModel | None = None
        if config.talker is not None and "talker" in params and "token2wav" in params:
            self.speech = SpeechModel(config, params, self.options, speakers or {})
        self._generate_fns: dict[tuple, Any] = {}
        self._logits_fn = jax.jit(self._thinker_forward)
        # Every distinct generate() input shape costs one compilation of prefill + decode; they are recorded
        # here (and logged when new) so that callers can check that bucketing keeps their number small.
        self.generate_shapes: set[tuple] = set()

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", param_dtype: str | None = None,
                        mesh_shape: Mapping[str, int] | None = None, attention_backend: str = "xla",
                        thinker_only: bool | None = None, scan_layers: bool = False) -> "OmniModel":
        """Load an HF Qwen2.5-Omni directory (config.json + safetensors) or an omni_jax checkpoint directory.

        dtype is the compute dtype; param_dtype (default: dtype) the dtype the weights are held in.
        mesh_shape, e.g. {"fsdp": 2, "tensor": 4}, shards the weights over the local devices.
        scan_layers=False (default for serving) unrolls the thinker LM and talker over per-layer weights: faster
        small-batch decode, longer compiles (RuntimeOptions.scan_layers).
        """
        from omni_jax.checkpoint import load_params
        from omni_jax.hf_mapping import load_hf_params

        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory not found: {path}")
        config = OmniConfig.from_pretrained(path)
        options = RuntimeOptions(dtype=dtype, param_dtype=param_dtype or dtype, attention_backend=attention_backend,
                                 scan_layers=scan_layers)
        if _is_converted_dir(path):
            params = load_params(os.path.join(path, "params"))
        else:
            if thinker_only is None:
                thinker_only = config.talker is None or not config.enable_audio_output
            params = load_hf_params(path, config, thinker_only=thinker_only)
        tokenizer = None
        if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
            from omni_jax.processing.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
        mesh = make_mesh(mesh_shape) if mesh_shape else None
        return cls(config, params, options, mesh=mesh, tokenizer=tokenizer, speakers=read_voices(path))

    def _thinker_subtree(self, thinker_params: Mapping[str, Any]) -> dict:
        abstract = jax.eval_shape(self._init_thinker_abstract)
        wanted = nn.meta.unbox(abstract)["params"]
        missing = [k for k in wanted if k not in thinker_params]
        if missing:
            raise KeyError(f"checkpoint lacks thinker parts {missing}")
        # checkpoints hold stacked decoder layers; an unrolled (scan_layers=False) model takes them per layer
        sub = match_layer_layout({k: thinker_params[k] for k in wanted}, wanted)
        expected = jax.tree_util.tree_map(lambda a: tuple(a.shape), wanted)
        got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), sub)
        if expected != got:
            raise ValueError("thinker parameter shapes do not match the config:\n"
                             f"expected {expected}\n     got {got}")
        return sub

    def _init_thinker_abstract(self):
        return init_thinker(self.thinker, jax.random.key(0))

    def thinker_param_shardings(self, mesh):
        """NamedShardings of the thinker params from their logical axis annotations."""
        return logical_shardings(jax.eval_shape(self._init_thinker_abstract)["params"], mesh)

    @contextlib.contextmanager
    def _mesh_context(self):
        if self.mesh is None:
            yield
        else:
            with jax.set_mesh(self.mesh), rules_context():
                yield

    # ---------------------------------------------------------------- forward
    def _thinker_forward(self, params, input_ids, positions, segment_ids, cache=None, multimodal=None,
                         last_logits_only=False):
        multimodal = multimodal or {}
        with rules_context():
            return self.thinker.apply({"params": params}, input_ids, positions, segment_ids, cache,
                                      last_logits_only=last_logits_only, **multimodal)

    def prepare(self, batch: Mapping[str, Any], use_audio_in_video: bool = False,
                pad_to: int | None = None) -> ThinkerInputs:
        """Host-side inputs (positions, encoder plans; counts checked) for a processor batch."""
        return prepare_thinker_inputs(batch, self.config.thinker, use_audio_in_video, pad_to=pad_to,
                                      pad_id=self._pad_id(None))

    def _shard_batch(self, *arrays):
        if self.mesh is None:
            return arrays
        out = []
        for a in arrays:
            axis = 1 if a.ndim == 3 and a.shape[0] == 3 else 0  # positions are [3, B, T]
            # Each process feeds only its devices' slices (multi-host: every host holds the same host batch).
            out.append(jax.make_array_from_callback(a.shape, batch_sharding(self.mesh, a.ndim, axis),
                                                    lambda index, a=a: a[index]))
        return tuple(out)

    def thinker_logits(self, batch: Mapping[str, Any], use_audio_in_video: bool = False) -> np.ndarray:
        """Logits [B, L, vocab] (float32) for a processor batch (any modalities); left padding is respected."""
        inputs = self.prepare(batch, use_audio_in_video)
        ids, pos, seg = self._shard_batch(inputs.input_ids, inputs.positions, inputs.attention_mask)
        with self._mesh_context():
            out = self._logits_fn(self.params["thinker"], ids, pos, seg, None, inputs.multimodal())
        return np.asarray(out.logits)

    # ---------------------------------------------------------------- generation
    def _eos_ids(self, eos_token_id) -> list[int]:
        if eos_token_id is None:
            eos_token_id = getattr(self.config.thinker, "eos_token_id", None) or 151645
        return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]

    def _pad_id(self, pad_token_id) -> int:
        if pad_token_id is None:
            pad_token_id = getattr(self.config.thinker, "pad_token_id", None)
        return 151643 if pad_token_id is None else int(pad_token_id)

    def generate(self, batch: Mapping[str, Any], max_new_tokens: int = 64, return_audio: bool = False,
                 speaker: Any = "Chelsie", eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, chunk_steps: int | None = None, on_tokens=None,
                 use_audio_in_video: bool = False, temperature=0.0, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, seed: int = 0, talker: Mapping[str, Any] | None = None,
                 token2wav: Mapping[str, Any] | None = None, on_audio=None) -> GenerateOutput:
        """Generation for a left-padded processor batch (any modalities); greedy when temperature is 0.

        temperature/top_k/top_p/repetition_penalty are scalars or per-row sequences; `seed` fixes the draws.
        `on_tokens(step, tokens [B, n])`, when given, is called after each chunk of `chunk_steps` decode steps
        with the tokens produced so far (streaming). Stops per row at an end token or after max_new_tokens.

        With return_audio, the talker turns the reply into codec tokens and Token2Wav into 24 kHz audio per row.
        `speaker` is a voice name or a `speech.Voice`; `talker` overrides the talker's sampling settings
        (keys of speech.TALKER_DEFAULTS, plus do_sample, and chunk_steps: talker steps per host round trip when
        streaming, default 12); `token2wav` may hold `noise` (a list of [2n, 80] arrays, one per row) and
        num_steps / guidance_scale / sway_coefficient.

        `on_audio(row, chunk)`, with return_audio, streams speech: the talker runs chunk_steps codes at a time and
        `streaming.StreamingToken2Wav` turns them into float32 24 kHz chunks in the released chunking (first
        chunk after 48 codec tokens), delivered in order per row; `audio` is then the concatenation of a row's
        chunks. It equals the whole-utterance waveform only within the bounded-context tolerance of
        docs/streaming.md (same noise: a row's noise depends on seed + row and the frame position only).
        """
        if on_audio is not None and not return_audio:
            raise ValueError("on_audio streams speech: pass return_audio=True with it")
        if return_audio:
            if self.speech is None:
                raise ValueError("this checkpoint has no talker/token2wav (converted thinker-only?); "
                                 "speech output is not available")
            voice = resolve_voice(self.speech.speakers, speaker)  # fail before generating
        input_ids = np.asarray(batch["input_ids"], np.int32)
        batch_size, prompt_len = input_ids.shape
        text_cfg = self.config.thinker.text
        max_positions = text_cfg.max_position_embeddings
        if prompt_len + max_new_tokens > max_positions:
            raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the "
                             f"context of {max_positions} positions")
        eos, pad = self._eos_ids(eos_token_id), self._pad_id(pad_token_id)

        bucket = generation.bucket_length(prompt_len)
        inputs = self.prepare(batch, use_audio_in_video, pad_to=bucket)
        sampling = SamplingParams.make(batch_size, temperature, top_k, top_p, repetition_penalty)
        use_penalty = bool(np.any(np.asarray(sampling.repetition_penalty) != 1.0))
        fn_key = (max_new_tokens, tuple(eos), pad, use_penalty, return_audio)
        if fn_key not in self._generate_fns:
            apply = partial(self._thinker_forward, last_logits_only=True)
            self._generate_fns[fn_key] = generation.make_generate_fns(
                apply, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad, vocab_size=text_cfg.vocab_size,
                use_penalty=use_penalty, keep_hidden=return_audio, platform=self.options.platform)
        prefill_fn, decode_fn = self._generate_fns[fn_key]
        self._note_shape(fn_key, batch_size, bucket, inputs)
        cache = KVCache.init(text_cfg.num_hidden_layers, batch_size, bucket + max_new_tokens,
                             text_cfg.num_key_value_heads, text_cfg.head_dim, jnp.dtype(self.options.dtype),
                             platform=self.options.platform)
        ids, mask, positions, first_pos = self._shard_batch(inputs.input_ids, inputs.attention_mask,
                                                            inputs.positions, inputs.next_positions)
        steps = max_new_tokens if chunk_steps is None else chunk_steps
        with self._mesh_context():
            state, prefill_out = prefill_fn(self.params["thinker"], ids, mask, positions, first_pos, cache,
                                            jax.random.key(seed), sampling, inputs.multimodal())
            while True:
                if on_tokens is not None:
                    on_tokens(int(state.step), _to_host(state.tokens)[:, : int(state.step)])
                if int(state.step) >= max_new_tokens or bool(jnp.all(state.done)):
                    break
                state = decode_fn(self.params["thinker"], state, steps)
        tokens = _to_host(state.tokens)
        generated = []
        for row in tokens:
            ends = np.nonzero(np.isin(row, eos))[0]
            generated.append(row[: ends[0] + 1] if len(ends) else row)
        text = [self.tokenizer.decode(g.tolist(), skip_special_tokens=True) if self.tokenizer else None
                for g in generated]
        sequences = np.concatenate([input_ids, tokens], axis=1)
        codec_tokens, audio = [None] * batch_size, [None] * batch_size
        if return_audio:
            t2w = dict(token2wav or {})
            noises = t2w.pop("noise", None)
            stream = None
            if on_audio is not None:
                from omni_jax.streaming import StreamingToken2Wav, TalkerAudioStream

                stream = TalkerAudioStream(StreamingToken2Wav(self.speech, voice, rows=batch_size, seed=seed,
                                                              noise=noises, **t2w), on_audio)
            codec_tokens = self._talk(inputs, state, prefill_out, voice, eos, seed, dict(talker or {}),
                                      on_codes=stream)
            if stream is not None:
                audio = stream.close()
            else:
                audio = [self.speech.token2wav(codes, voice, noise=None if noises is None else noises[row],
                                               seed=seed + row, **t2w) if len(codes) else np.zeros((0,), np.float32)
                         for row, codes in enumerate(codec_tokens)]
        return GenerateOutput(sequences=sequences, generated=generated, text=text,
                              codec_tokens=codec_tokens, audio=audio)

    def _note_shape(self, fn_key: tuple, batch_size: int, bucket: int, inputs: ThinkerInputs) -> None:
        """Record the compiled-shape signature of one generate() call; log the first time it is seen."""
        media = tuple((name, tuple(np.shape(leaf) for leaf in jax.tree_util.tree_leaves(getattr(inputs, name))))
                      for name in ("audio", "image", "video") if getattr(inputs, name) is not None)
        shape = (fn_key, batch_size, bucket, media)
        if shape not in self.generate_shapes:
            self.generate_shapes.add(shape)
            log.info("generate: new shape #%d (batch %d, prompt bucket %d, max_new_tokens %d, media %s)",
                     len(self.generate_shapes), batch_size, bucket, fn_key[0], media or "none")

    @property
    def num_compiled_shapes(self) -> int:
        """Number of distinct generate() shapes compiled so far (each = one prefill + one decode program)."""
        return len(self.generate_shapes)

    def _talk(self, inputs: ThinkerInputs, state, prefill_out, voice: Voice, thinker_eos, seed: int,
              settings: dict, on_codes=None) -> list[np.ndarray]:
        """Talker codec tokens per row for a finished thinker generation (kept hidden states).

        With `on_codes(codes_per_row, ended [B] bool)`, decode runs `chunk_steps` codes per host round trip and
        reports each row's codes so far (cut at its end token) after every round."""
        cfg_t, cfg = self.config.talker, self.config.thinker
        num_generated = int(state.step)
        if num_generated < 2:
            raise ValueError("speech needs at least 2 generated thinker tokens (the talker consumes the reply "
                             "one token behind); raise max_new_tokens")
        opts = {**TALKER_DEFAULTS, **settings}
        do_sample = opts.pop("do_sample", True)
        max_codes = int(opts.pop("max_new_tokens"))
        chunk_steps = max(1, int(opts.pop("chunk_steps", 12)))
        eos_ids = tuple(opts.pop("eos_token_id", (cfg_t.tts_codec_pad_token_id, cfg_t.tts_codec_end_token_id)))
        if not do_sample:
            opts["temperature"] = 0.0
        batch_size, prompt_len = inputs.input_ids.shape
        speaker_bos = jnp.full((batch_size,), voice.bos_token, jnp.int32)
        embed = lambda ids: self.thinker.apply({"params": self.params["thinker"]}, ids, method=Thinker.embed)  # noqa: E731
        codec_embed = lambda ids: self.speech.codec_embed(self.speech.talker_params, ids)  # noqa: E731
        prefill_embeds, reply = jax.jit(partial(
            build_talker_inputs, embed, codec_embed,
            placeholder_ids=(cfg.audio_token_index, cfg.image_token_index, cfg.video_token_index),
            thinker_eos_ids=tuple(thinker_eos), tts_eos=cfg_t.tts_text_end_token_id,
            tts_pad=cfg_t.tts_text_pad_token_id, codec_pad=cfg_t.tts_codec_pad_token_id,
            codec_bos=cfg_t.tts_codec_start_token_id))(
            jnp.asarray(inputs.input_ids), prefill_out.inputs_embeds, prefill_out.hidden_states, state.tokens,
            state.hidden, jnp.asarray(num_generated), speaker_bos)

        first_token = np.asarray(state.tokens[:, :1])
        text_ids = np.concatenate([inputs.input_ids, np.full((batch_size, 1), voice.bos_token, np.int32),
                                   first_token], axis=1)
        talker_mask = np.concatenate([inputs.attention_mask, np.ones((batch_size, 2), np.int32)], axis=1)
        positions, deltas = rope_index(text_ids, talker_mask, config=cfg_t, **inputs.rope_kwargs)
        seen_ids = np.concatenate([np.full((batch_size, prompt_len), cfg_t.tts_codec_mask_token_id),
                                   np.full((batch_size, 1), cfg_t.tts_codec_pad_token_id),
                                   np.full((batch_size, 1), cfg_t.tts_codec_start_token_id)], axis=1)
        job = TalkerJob(prefill=prefill_embeds, reply=reply, positions=jnp.asarray(positions, jnp.int32),
                        segment_ids=jnp.asarray(talker_mask), seen_ids=jnp.asarray(seen_ids, jnp.int32),
                        first_position=jnp.asarray(talker_mask.sum(-1) + deltas, jnp.int32))
        sampling = SamplingParams.make(batch_size, opts["temperature"], opts["top_k"], opts["top_p"],
                                       opts["repetition_penalty"])
        use_penalty = bool(np.any(np.asarray(sampling.repetition_penalty) != 1.0))
        prefill_fn, decode_fn = self.speech.talker_fns(max_codes, eos_ids, use_penalty)
        cache = KVCache.init(cfg_t.num_hidden_layers, batch_size, prompt_len + 2 + max_codes,
                             cfg_t.num_key_value_heads, cfg_t.head_dim, jnp.dtype(self.options.dtype),
                             platform=self.options.platform)
        talker_state = prefill_fn(self.speech.talker_params, job, cache, jax.random.key(seed + 1), sampling)
        steps = max_codes if on_codes is None else chunk_steps
        while True:
            if on_codes is not None:
                tokens = np.asarray(talker_state.tokens)[:, : int(talker_state.step)]
                on_codes(codes_before_end(tokens, eos_ids), np.isin(tokens, eos_ids).any(axis=1))
            if int(talker_state.step) >= max_codes or bool(jnp.all(talker_state.done)):
                break
            talker_state = decode_fn(self.speech.talker_params, talker_state, reply, steps)
        return codes_before_end(np.asarray(talker_state.tokens), eos_ids)

    def token2wav(self, codes, speaker: Any = "Chelsie", noise=None, seed: int = 0, **kwargs) -> np.ndarray:
        """Codec ids -> 24 kHz float32 waveform; `noise` [2n, 80] fixes the flow-matching start state."""
        if self.speech is None:
            raise ValueError("this checkpoint has no token2wav")
        return self.speech.token2wav(codes, resolve_voice(self.speech.speakers, speaker), noise=noise, seed=seed,
                                     **kwargs)
