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
from omni_jax.models.kv_cache import KVCache
from omni_jax.model_inputs import ThinkerInputs, prepare_thinker_inputs
from omni_jax.models.thinker import Thinker, init_thinker
from omni_jax.sampling import SamplingParams
from omni_jax.sharding import batch_sharding, logical_shardings, make_mesh, rules_context

log = logging.getLogger(__name__)

@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # [B, L + N] prompt (as given, left padded) followed by the generated tokens
    generated: list[np.ndarray]  # per row: generated ids up to and including the first end token
    text: list[Optional[str]]  # decoded generated text per row (None without a tokenizer)
    codec_tokens: list[Optional[np.ndarray]]  # talker codes per row (None where no speech was asked for)
    audio: list[Optional[np.ndarray]]  # 24 kHz float32 waveform per row (None where no speech was asked for)


def _is_converted_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "omni_jax.json"))


class OmniModel:
    """Qwen2.5-Omni in JAX: config, params (optionally sharded on a mesh) and jitted entry points."""

    def __init__(self, config: OmniConfig, params: Mapping[str, Any], options: RuntimeOptions | None = None,
                 mesh: jax.sharding.Mesh | None = None, tokenizer=None):
        self.config = config
        self.options = options or RuntimeOptions()
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
        self.params = {"thinker": thinker_params}
        self._generate_fns: dict[tuple, Any] = {}
        self._logits_fn = jax.jit(self._thinker_forward)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", param_dtype: str | None = None,
                        mesh_shape: Mapping[str, int] | None = None, attention_backend: str = "xla",
                        thinker_only: bool | None = None) -> "OmniModel":
        """Load an HF Qwen2.5-Omni directory (config.json + safetensors) or an omni_jax checkpoint directory.

        dtype is the compute dtype; param_dtype (default: dtype) the dtype the weights are held in.
        mesh_shape, e.g. {"fsdp": 2, "tensor": 4}, shards the weights over the local devices.
        """
        from omni_jax.checkpoint import load_params
        from omni_jax.hf_mapping import load_hf_params

        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory not found: {path}")
        config = OmniConfig.from_pretrained(path)
        options = RuntimeOptions(dtype=dtype, param_dtype=param_dtype or dtype, attention_backend=attention_backend)
        if _is_converted_dir(path):
            params = load_params(os.path.join(path, "params"))
        else:
            if thinker_only is None:
                thinker_only = True  # the talker / token2wav are loaded by the speech path when present
            params = load_hf_params(path, config, thinker_only=thinker_only)
        tokenizer = None
        if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
            from omni_jax.processing.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
        mesh = make_mesh(mesh_shape) if mesh_shape else None
        return cls(config, params, options, mesh=mesh, tokenizer=tokenizer)

    def _thinker_subtree(self, thinker_params: Mapping[str, Any]) -> dict:
        abstract = jax.eval_shape(self._init_thinker_abstract)
        wanted = nn.meta.unbox(abstract)["params"]
        missing = [k for k in wanted if k not in thinker_params]
        if missing:
            raise KeyError(f"checkpoint lacks thinker parts {missing}")
        sub = {k: thinker_params[k] for k in wanted}
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
            out.append(jax.device_put(a, batch_sharding(self.mesh, a.ndim, axis)))
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
                 speaker: str | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, chunk_steps: int | None = None, on_tokens=None,
                 use_audio_in_video: bool = False, temperature=0.0, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, seed: int = 0) -> GenerateOutput:
        """Generation for a left-padded processor batch (any modalities); greedy when temperature is 0.

        temperature/top_k/top_p/repetition_penalty are scalars or per-row sequences; `seed` fixes the draws.

        `on_tokens(step, tokens [B, n])`, when given, is called after each chunk of `chunk_steps` decode steps
        with the tokens produced so far (streaming). Stops per row at an end token or after max_new_tokens.
        """
        if return_audio:
            raise NotImplementedError("speech output needs the talker and token2wav, not in this build yet")
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
        fn_key = (max_new_tokens, tuple(eos), pad, use_penalty)
        if fn_key not in self._generate_fns:
            apply = partial(self._thinker_forward, last_logits_only=True)
            self._generate_fns[fn_key] = generation.make_generate_fns(
                apply, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad, vocab_size=text_cfg.vocab_size,
                use_penalty=use_penalty)
        prefill_fn, decode_fn = self._generate_fns[fn_key]
        cache = KVCache.init(text_cfg.num_hidden_layers, batch_size, bucket + max_new_tokens,
                             text_cfg.num_key_value_heads, text_cfg.head_dim, jnp.dtype(self.options.dtype))
        ids, mask, positions, first_pos = self._shard_batch(inputs.input_ids, inputs.attention_mask,
                                                            inputs.positions, inputs.next_positions)
        steps = max_new_tokens if chunk_steps is None else chunk_steps
        with self._mesh_context():
            state, _ = prefill_fn(self.params["thinker"], ids, mask, positions, first_pos, cache,
                                  jax.random.key(seed), sampling, inputs.multimodal())
            while True:
                if on_tokens is not None:
                    on_tokens(int(state.step), np.asarray(state.tokens[:, : int(state.step)]))
                if int(state.step) >= max_new_tokens or bool(jnp.all(state.done)):
                    break
                state = decode_fn(self.params["thinker"], state, steps)
        tokens = np.asarray(state.tokens)
        generated = []
        for row in tokens:
            ends = np.nonzero(np.isin(row, eos))[0]
            generated.append(row[: ends[0] + 1] if len(ends) else row)
        text = [self.tokenizer.decode(g.tolist(), skip_special_tokens=True) if self.tokenizer else None
                for g in generated]
        sequences = np.concatenate([input_ids, tokens], axis=1)
        return GenerateOutput(sequences=sequences, generated=generated, text=text,
                              codec_tokens=[None] * batch_size, audio=[None] * batch_size)
