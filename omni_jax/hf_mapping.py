"""The HF <-> omni_jax weight table: one row per HF tensor pattern, derived from the config.

A row (`Rule`) says: the HF on-disk name (with `{i}` for the layer index), our path in the param tree, the
HF shape of one tensor (from the config), and the transform between the two layouts (with its inverse).
Rows whose name has `{i}` are stacked on a leading `layers` axis, because our decoders are scanned.

    params = load_hf_params(hf_dir, config, dtype="bfloat16")       # nested dict of numpy arrays
    for hf_name, array in iter_hf_tensors(params, config): ...       # back to HF names and layouts

Names (spec §11.1): the on-disk legacy names (`thinker.model.layers.*`, `thinker.audio_tower.*`,
`thinker.visual.*`, what `save_pretrained` writes) and the transformers-5 in-memory names
(`thinker.model.language_model.*`, `thinker.model.audio_tower.*`, `thinker.model.visual.*`) are both accepted
on read; we always write the on-disk names. A thinker-only checkpoint (config.json with model_type
`qwen2_5_omni_thinker`, saved by `Qwen2_5OmniThinkerForConditionalGeneration`) has the same names without the
leading `thinker.`.

Validation collects every missing tensor, unexpected tensor and mis-shaped tensor and raises them together
as one `CheckpointMismatchError`.

Adding a sub-model (talker, token2wav) is adding a `*_rules(config)` function and its entry in `SECTIONS`;
the Conv1d and ConvTranspose1d layout transforms they need are here already.
"""
from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from omni_jax.config import OmniConfig, ThinkerConfig
from omni_jax.tree_utils import flatten_params, unflatten_params  # noqa: F401 (re-exported)
from omni_jax.weights.safetensors_io import TensorInfo, TensorReader, dtype_from_name, index_hf_dir

__all__ = [
    "CheckpointMismatchError", "Transform", "Rule", "IDENTITY", "LINEAR", "CONV1D", "CONV_TRANSPOSE1D",
    "FLATTEN_IN", "transpose2d", "split_heads_out", "split_heads_bias", "merge_heads_in", "thinker_rules", "rules_for",
    "SECTIONS", "OPTIONAL_SECTIONS", "canonical_name", "output_name", "HFCheckpointReader",
    "load_hf_params", "iter_hf_tensors", "export_plan", "as_omni_config", "flatten_params",
    "unflatten_params", "SKIPPED_FILES_THINKER_ONLY",
]


# ================================================================================================ errors

class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the config: every missing / unexpected / mis-shaped tensor at once.

    Attributes: `missing` [(name, expected_shape)], `unexpected` [(name, shape)],
    `mismatched` [(name, expected_shape, actual_shape)].
    """

    MAX_LISTED = 30  # per category; the rest is summarised by prefix

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), hint: str | None = None,
                 summarize_prefixes: Sequence[str] = ()):
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.hint = hint
        self.summarize_prefixes = tuple(summarize_prefixes)  # whole sub-models: one line each
        super().__init__(self._format())

    def _format(self) -> str:
        n = len(self.missing) + len(self.unexpected) + len(self.mismatched)
        lines = [f"{self.source} does not match the config: {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} with the wrong shape ({n} problems)"]

        def block(title, items, fmt):
            if not items:
                return
            lines.append(f"{title} ({len(items)}):")
            for item in items[:self.MAX_LISTED]:
                lines.append("  " + fmt(item))
            rest = items[self.MAX_LISTED:]
            if rest:
                groups = defaultdict(int)
                for item in rest:
                    groups[_group_of(item[0])] += 1
                summary = ", ".join(f"{g}* x{c}" for g, c in sorted(groups.items()))
                lines.append(f"  ... and {len(rest)} more: {summary}")

        block("missing", self.missing, lambda m: f"{m[0]}: expected shape {_fmt_shape(m[1])}")
        unexpected = self.unexpected
        if self.summarize_prefixes:
            grouped = defaultdict(list)
            for u in unexpected:
                prefix = next((p for p in self.summarize_prefixes if u[0].startswith(p)), None)
                grouped[prefix].append(u)
            unexpected = grouped.pop(None, [])
            for prefix, items in sorted(grouped.items()):
                examples = ", ".join(u[0] for u in items[:3])
                lines.append(f"unexpected: {len(items)} tensors under {prefix}* (e.g. {examples}"
                             f"{', ...' if len(items) > 3 else ''})")
        block("unexpected", unexpected,
              lambda u: f"{u[0]}: shape {_fmt_shape(u[1])}" if u[1] is not None else u[0])
        block("wrong shape", self.mismatched,
              lambda m: f"{m[0]}: expected {_fmt_shape(m[1])}, got {_fmt_shape(m[2])}")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "?"


def _group_of(name: str) -> str:
    """'talker.model.layers.3.mlp.up_proj.weight' -> 'talker.model.layers.' (for summaries)."""
    parts = name.replace("/", ".").split(".")
    return ".".join(parts[:3]) + "."


# ================================================================================================ transforms

@dataclasses.dataclass(frozen=True)
class Transform:
    """HF layout <-> our layout for ONE tensor (one layer of a stacked leaf).

    shape(hf_shape) -> our shape; forward(hf_array) -> ours; inverse(our_array, hf_shape) -> hf layout.
    """

    name: str
    shape: Callable[[tuple], tuple]
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray, tuple], np.ndarray]

    def __repr__(self):
        return f"Transform({self.name})"


_TILE = 256


def transpose2d(x: np.ndarray) -> np.ndarray:
    """x.T as a new C-contiguous array, copied in 256x256 tiles: numpy's plain strided copy of a large
    transpose is 5-8x slower (cache misses), and it dominated conversion time."""
    rows, cols = x.shape
    if x.size < (1 << 20):
        return np.ascontiguousarray(x.T)
    out = np.empty((cols, rows), x.dtype)
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            out[j:j + _TILE, i:i + _TILE] = x[i:i + _TILE, j:j + _TILE].T
    return out


IDENTITY = Transform("identity", lambda s: tuple(s), lambda x: x, lambda y, s: y)

# torch Linear weight [out, in] -> Flax Dense kernel [in, out]
LINEAR = Transform("linear", lambda s: (s[1], s[0]), transpose2d, lambda y, s: transpose2d(y))

# torch Conv1d weight [out, in, k] -> Flax Conv kernel [k, in, out]
CONV1D = Transform("conv1d", lambda s: (s[2], s[1], s[0]), lambda x: x.transpose(2, 1, 0),
                   lambda y, s: y.transpose(2, 1, 0))

# torch ConvTranspose1d weight [in, out, k] -> Flax `nn.ConvTranspose` kernel [k, in, out] (its default
# transpose_kernel=False: a plain conv over the stride-dilated input, so the taps are flipped).
CONV_TRANSPOSE1D = Transform("conv_transpose1d", lambda s: (s[2], s[0], s[1]),
                             lambda x: x.transpose(2, 0, 1)[::-1],
                             lambda y, s: y[::-1].transpose(1, 2, 0))

# torch weight [out, *in_dims] (e.g. the Conv3d patch embed [C, 3, 2, 14, 14]) -> Dense kernel [prod(in), out]
FLATTEN_IN = Transform("flatten_in", lambda s: (int(np.prod(s[1:])), s[0]),
                       lambda x: transpose2d(x.reshape(x.shape[0], -1)), lambda y, s: transpose2d(y).reshape(s))


def split_heads_out(heads: int, head_dim: int) -> Transform:
    """q/k/v Linear weight [heads*head_dim, D] -> kernel [D, heads, head_dim]."""
    return Transform(f"split_heads_out({heads},{head_dim})", lambda s: (s[1], heads, head_dim),
                     lambda x: transpose2d(x).reshape(x.shape[1], heads, head_dim),
                     lambda y, s: transpose2d(y.reshape(y.shape[0], heads * head_dim)))


def split_heads_bias(heads: int, head_dim: int) -> Transform:
    """q/k/v bias [heads*head_dim] -> [heads, head_dim]."""
    return Transform(f"split_heads_bias({heads},{head_dim})", lambda s: (heads, head_dim),
                     lambda x: x.reshape(heads, head_dim), lambda y, s: y.reshape(heads * head_dim))


def merge_heads_in(heads: int, head_dim: int) -> Transform:
    """o_proj Linear weight [D, heads*head_dim] -> kernel [heads, head_dim, D]."""
    return Transform(f"merge_heads_in({heads},{head_dim})", lambda s: (heads, head_dim, s[0]),
                     lambda x: transpose2d(x).reshape(heads, head_dim, x.shape[0]),
                     lambda y, s: transpose2d(y.reshape(heads * head_dim, y.shape[-1])))


# ================================================================================================ rows

@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table.

    hf: canonical HF on-disk name (full-model root, i.e. starting with `thinker.` / `talker.` / `token2wav.`),
        with `{i}` for the layer index when `layers` > 0.
    ours: our path, '/'-separated ('thinker/decoder/layers/self_attn/q_proj/kernel').
    hf_shape: the HF shape of one tensor (one layer), from the config.
    transform: HF layout <-> ours (see `Transform`).
    layers: number of stacked layers (leading axis of our leaf) or 0 for an unstacked tensor.
    fallback: HF name read instead when `hf` is absent (tied embeddings).
    """

    hf: str
    ours: str
    hf_shape: tuple
    transform: Transform = IDENTITY
    layers: int = 0
    fallback: Optional[str] = None

    @property
    def path(self) -> tuple:
        return tuple(self.ours.split("/"))

    @property
    def our_shape(self) -> tuple:
        one = tuple(self.transform.shape(tuple(self.hf_shape)))
        return (self.layers,) + one if self.layers else one

    def hf_names(self) -> list[str]:
        return [self.hf.format(i=i) for i in range(self.layers)] if self.layers else [self.hf]


def _linear(hf: str, ours: str, d_in: int, d_out: int, bias: bool, layers: int = 0) -> list[Rule]:
    rows = [Rule(hf + ".weight", ours + "/kernel", (d_out, d_in), LINEAR, layers)]
    if bias:
        rows.append(Rule(hf + ".bias", ours + "/bias", (d_out,), IDENTITY, layers))
    return rows


def _attn_in(hf: str, ours: str, d_in: int, heads: int, head_dim: int, bias: bool, layers: int) -> list[Rule]:
    rows = [Rule(hf + ".weight", ours + "/kernel", (heads * head_dim, d_in), split_heads_out(heads, head_dim),
                 layers)]
    if bias:
        rows.append(Rule(hf + ".bias", ours + "/bias", (heads * head_dim,), split_heads_bias(heads, head_dim),
                         layers))
    return rows


def _attn_out(hf: str, ours: str, d_out: int, heads: int, head_dim: int, bias: bool, layers: int) -> list[Rule]:
    rows = [Rule(hf + ".weight", ours + "/kernel", (d_out, heads * head_dim), merge_heads_in(heads, head_dim),
                 layers)]
    if bias:
        rows.append(Rule(hf + ".bias", ours + "/bias", (d_out,), IDENTITY, layers))
    return rows


def _norm(hf: str, ours: str, dim: int, bias: bool = False, layers: int = 0) -> list[Rule]:
    rows = [Rule(hf + ".weight", ours + "/scale", (dim,), IDENTITY, layers)]
    if bias:
        rows.append(Rule(hf + ".bias", ours + "/bias", (dim,), IDENTITY, layers))
    return rows


def thinker_rules(cfg: ThinkerConfig) -> list[Rule]:
    """Rows for the thinker: LM (spec §6, §11.2), audio tower (§4) and vision tower (§5)."""
    rows: list[Rule] = []

    # ---- language model: thinker.model.* -> thinker/{embed_tokens, decoder, lm_head}
    t = cfg.text
    D, V, F, L = t.hidden_size, t.vocab_size, t.intermediate_size, t.num_hidden_layers
    H, K = t.num_attention_heads, t.num_key_value_heads
    hd = t.head_dim or D // H
    p, o = "thinker.model.layers.{i}.", "thinker/decoder/layers/"
    rows.append(Rule("thinker.model.embed_tokens.weight", "thinker/embed_tokens/embedding", (V, D)))
    rows += _norm(p + "input_layernorm", o + "input_layernorm", D, layers=L)
    rows += _attn_in(p + "self_attn.q_proj", o + "self_attn/q_proj", D, H, hd, True, L)
    rows += _attn_in(p + "self_attn.k_proj", o + "self_attn/k_proj", D, K, hd, True, L)
    rows += _attn_in(p + "self_attn.v_proj", o + "self_attn/v_proj", D, K, hd, True, L)
    rows += _attn_out(p + "self_attn.o_proj", o + "self_attn/o_proj", D, H, hd, False, L)
    rows += _norm(p + "post_attention_layernorm", o + "post_attention_layernorm", D, layers=L)
    rows += _linear(p + "mlp.gate_proj", o + "mlp/gate_proj", D, F, False, L)
    rows += _linear(p + "mlp.up_proj", o + "mlp/up_proj", D, F, False, L)
    rows += _linear(p + "mlp.down_proj", o + "mlp/down_proj", F, D, False, L)
    rows += _norm("thinker.model.norm", "thinker/decoder/norm", D)
    rows.append(Rule("thinker.lm_head.weight", "thinker/lm_head/kernel", (V, D), LINEAR,
                     fallback="thinker.model.embed_tokens.weight" if cfg.tie_word_embeddings else None))

    # ---- audio tower: thinker.audio_tower.* -> thinker/audio_tower
    a = cfg.audio
    d, Ha, Fa, La, out = a.d_model, a.encoder_attention_heads, a.encoder_ffn_dim, a.encoder_layers, a.output_dim
    hda = d // Ha
    p, o = "thinker.audio_tower.", "thinker/audio_tower/"
    rows += [Rule(p + "conv1.weight", o + "conv1/kernel", (d, a.num_mel_bins, 3), CONV1D),
             Rule(p + "conv1.bias", o + "conv1/bias", (d,)),
             Rule(p + "conv2.weight", o + "conv2/kernel", (d, d, 3), CONV1D),
             Rule(p + "conv2.bias", o + "conv2/bias", (d,))]
    lp, lo = p + "layers.{i}.", o + "layers/"
    rows += _norm(lp + "self_attn_layer_norm", lo + "self_attn_layer_norm", d, bias=True, layers=La)
    rows += _attn_in(lp + "self_attn.q_proj", lo + "self_attn/q_proj", d, Ha, hda, True, La)
    rows += _attn_in(lp + "self_attn.k_proj", lo + "self_attn/k_proj", d, Ha, hda, False, La)  # no k bias
    rows += _attn_in(lp + "self_attn.v_proj", lo + "self_attn/v_proj", d, Ha, hda, True, La)
    rows += _attn_out(lp + "self_attn.out_proj", lo + "self_attn/out_proj", d, Ha, hda, True, La)
    rows += _norm(lp + "final_layer_norm", lo + "final_layer_norm", d, bias=True, layers=La)
    rows += _linear(lp + "fc1", lo + "fc1", d, Fa, True, La)
    rows += _linear(lp + "fc2", lo + "fc2", Fa, d, True, La)
    rows += _norm(p + "ln_post", o + "ln_post", d, bias=True)
    rows += _linear(p + "proj", o + "proj", d, out, True)
    rows.append(Rule(p + "audio_bos_eos_token.weight", o + "audio_bos_eos_token/embedding", (2, out)))

    # ---- vision tower: thinker.visual.* -> thinker/visual
    v = cfg.vision
    C, Hv, Fv, Lv = v.hidden_size, v.num_heads, v.intermediate_size, v.depth
    hdv, merged = C // Hv, C * v.spatial_merge_size ** 2
    p, o = "thinker.visual.", "thinker/visual/"
    rows.append(Rule(p + "patch_embed.proj.weight", o + "patch_embed/kernel",
                     (C, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), FLATTEN_IN))
    bp, bo = p + "blocks.{i}.", o + "blocks/"
    rows += _norm(bp + "norm1", bo + "norm1", C, layers=Lv)
    rows += _norm(bp + "norm2", bo + "norm2", C, layers=Lv)
    for name in ("q", "k", "v"):
        rows += _attn_in(bp + f"attn.{name}", bo + f"attn/{name}", C, Hv, hdv, True, Lv)
    rows += _attn_out(bp + "attn.proj", bo + "attn/proj", C, Hv, hdv, True, Lv)
    rows += _linear(bp + "mlp.gate_proj", bo + "mlp/gate_proj", C, Fv, True, Lv)
    rows += _linear(bp + "mlp.up_proj", bo + "mlp/up_proj", C, Fv, True, Lv)
    rows += _linear(bp + "mlp.down_proj", bo + "mlp/down_proj", Fv, C, True, Lv)
    rows += _norm(p + "merger.ln_q", o + "merger/ln_q", C)
    rows += _linear(p + "merger.mlp.0", o + "merger/mlp_0", merged, merged, True)
    rows += _linear(p + "merger.mlp.2", o + "merger/mlp_2", merged, v.out_hidden_size, True)
    return rows


# HF top-level prefix -> rows builder. The talker and token2wav rows are added here with their modules.
def _talker_rules(config) -> list[Rule]:
    from omni_jax.hf_speech_rules import talker_rules  # it builds on this module's helpers

    return talker_rules(config.talker)


def _token2wav_rules(config) -> list[Rule]:
    from omni_jax.hf_speech_rules import token2wav_rules

    return token2wav_rules(config.token2wav)


SECTIONS: dict[str, Callable[[Any], list[Rule]]] = {
    "thinker": lambda config: thinker_rules(config.thinker),
    "talker": _talker_rules,
    "token2wav": _token2wav_rules,
}
# Sub-models that thinker_only=True skips on purpose (with the files that belong to them).
OPTIONAL_SECTIONS = ("talker", "token2wav")
SKIPPED_FILES_THINKER_ONLY = ("spk_dict.pt",)


def rules_for(config, thinker_only: bool = False) -> list[Rule]:
    """All rows for this config (only the thinker's when thinker_only or the config has no talker)."""
    config = as_omni_config(config)
    rows: list[Rule] = []
    for section, build in SECTIONS.items():
        if section in OPTIONAL_SECTIONS and (thinker_only or getattr(config, section, None) is None):
            continue
        rows += build(config)
    return rows


def as_omni_config(config) -> OmniConfig:
    """OmniConfig from an OmniConfig, a ThinkerConfig, an HF config dict, or an HF directory path."""
    if isinstance(config, OmniConfig):
        return config
    if isinstance(config, ThinkerConfig):
        return OmniConfig(thinker=config, talker=None, token2wav=None, enable_audio_output=False,
                          hf_root="thinker")
    if isinstance(config, Mapping):
        return OmniConfig.from_hf_config(config)
    if isinstance(config, (str, os.PathLike)):
        return OmniConfig.from_pretrained(os.fspath(config))
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return OmniConfig.from_hf_config(config.to_dict())
    raise TypeError(f"cannot make an OmniConfig from {type(config).__name__}")


# ================================================================================================ names

# transformers-5 in-memory prefix -> on-disk legacy prefix (spec §11.1), on the full-model root.
_IN_MEMORY_PREFIXES = (
    ("thinker.model.language_model.", "thinker.model."),
    ("thinker.model.audio_tower.", "thinker.audio_tower."),
    ("thinker.model.visual.", "thinker.visual."),
)


def canonical_name(name: str, thinker_root: bool = False) -> str:
    """Any accepted HF name -> the on-disk legacy name on the full-model root (`thinker.…`)."""
    if thinker_root:
        name = "thinker." + name
    for alias, disk in _IN_MEMORY_PREFIXES:
        if name.startswith(alias):
            return disk + name[len(alias):]
    return name


def output_name(canonical: str, thinker_root: bool = False) -> str:
    """The name we write: on-disk legacy names; without `thinker.` for a thinker-only checkpoint."""
    if thinker_root:
        if not canonical.startswith("thinker."):
            raise ValueError(f"{canonical} cannot be written into a thinker-only checkpoint")
        return canonical[len("thinker."):]
    return canonical


# ================================================================================================ reading

@dataclasses.dataclass
class LeafPlan:
    """How to build one of our leaves: the rule and the HF tensors (one per layer) to read."""

    rule: Rule
    sources: list[TensorInfo]

    @property
    def path(self) -> tuple:
        return self.rule.path

    @property
    def shape(self) -> tuple:
        return self.rule.our_shape

    def dtype(self, dtype=None) -> np.dtype:
        if dtype is not None:
            return dtype_from_name(dtype)
        return np.result_type(*[s.dtype for s in self.sources])


class HFCheckpointReader:
    """An HF checkpoint directory checked against the config (all problems raised at once on construction),
    and read leaf by leaf.

        reader = HFCheckpointReader(hf_dir, config, thinker_only=True)
        reader.skipped          # HF tensor names skipped on purpose (talker.*, token2wav.*)
        reader.skipped_files    # e.g. ['spk_dict.pt']
        for path, array in reader.iter_leaves(dtype="bfloat16"): ...
    """

    def __init__(self, hf_dir: str, config=None, thinker_only: bool = False):
        self.hf_dir = hf_dir
        self.config = as_omni_config(config if config is not None else hf_dir)
        self.thinker_only = bool(thinker_only)
        self.thinker_root = self.config.hf_root == "thinker"
        self.tensors = index_hf_dir(hf_dir)
        self.leaves, self.skipped = self._plan()
        self.skipped_files = [f for f in SKIPPED_FILES_THINKER_ONLY
                              if self.thinker_only and os.path.exists(os.path.join(hf_dir, f))]

    def _plan(self) -> tuple[list[LeafPlan], list[str]]:
        by_canonical: dict[str, TensorInfo] = {}
        unexpected: list[tuple] = []
        for name, info in self.tensors.items():
            canon = canonical_name(name, self.thinker_root)
            if canon in by_canonical:
                unexpected.append((name, info.shape))  # both layouts of one tensor: ambiguous
                continue
            by_canonical[canon] = info
        rows = rules_for(self.config, thinker_only=self.thinker_only)
        used: set[str] = set()
        missing, mismatched, leaves = [], [], []
        for rule in rows:
            sources = []
            for canon in rule.hf_names():
                info = by_canonical.get(canon)
                if info is None and rule.fallback is not None:
                    info = by_canonical.get(rule.fallback)
                shown = output_name(canon, self.thinker_root) if info is None else info.name
                if info is None:
                    missing.append((shown, rule.hf_shape))
                    continue
                used.add(canonical_name(info.name, self.thinker_root))
                if tuple(info.shape) != tuple(rule.hf_shape):
                    mismatched.append((info.name, rule.hf_shape, info.shape))
                sources.append(info)
            leaves.append(LeafPlan(rule, sources))
        skipped = []
        skip_prefixes = tuple(s + "." for s in OPTIONAL_SECTIONS) if self.thinker_only else ()
        for canon, info in by_canonical.items():
            if canon in used:
                continue
            if skip_prefixes and canon.startswith(skip_prefixes):
                skipped.append(info.name)
            else:
                unexpected.append((info.name, info.shape))
        if self.thinker_only is False and not self.thinker_root:
            # spk_dict.pt belongs to token2wav, which this build does not convert yet
            for f in SKIPPED_FILES_THINKER_ONLY:
                if os.path.exists(os.path.join(self.hf_dir, f)) and "token2wav" not in SECTIONS:
                    unexpected.append((f + " (speaker data for token2wav, a file)", None))
        if missing or unexpected or mismatched:
            hint = None
            optional = [u for u in unexpected if u[0].startswith(tuple(s + "." for s in OPTIONAL_SECTIONS))
                        or u[0].startswith(SKIPPED_FILES_THINKER_ONLY)]
            if optional and not self.thinker_only:
                hint = (f"{len(optional)} of the unexpected entries belong to the talker / token2wav, which this "
                        f"build cannot convert yet: pass thinker_only=True (--thinker-only) to convert the "
                        f"thinker alone and skip them on purpose.")
            raise CheckpointMismatchError(f"HF checkpoint {self.hf_dir}", missing, sorted(unexpected,
                                          key=lambda u: u[0]), mismatched, hint,
                                          summarize_prefixes=[s + "." for s in OPTIONAL_SECTIONS])
        return leaves, sorted(skipped)

    def iter_leaves(self, dtype=None) -> Iterator[tuple[tuple, np.ndarray]]:
        """(our path, array) for every leaf, one at a time: per-layer tensors are read and stacked into one
        preallocated array, so the peak is one stacked leaf plus one layer."""
        with TensorReader() as reader:
            for leaf in self.leaves:
                yield leaf.path, self.read_leaf(leaf, dtype, reader)

    def read_leaf(self, leaf: LeafPlan, dtype=None, reader: TensorReader | None = None) -> np.ndarray:
        out_dtype = leaf.dtype(dtype)
        fwd = leaf.rule.transform.forward
        own = reader is None
        reader = reader or TensorReader()
        try:
            if not leaf.rule.layers:
                x = fwd(reader.read(leaf.sources[0]))
                return np.ascontiguousarray(x, dtype=out_dtype)
            out = np.empty(leaf.shape, out_dtype)
            for i, info in enumerate(leaf.sources):
                out[i] = fwd(reader.read(info))  # casts (round to nearest even) on assignment
            return out
        finally:
            if own:
                reader.close()


def load_hf_params(hf_dir: str, config=None, dtype=None, thinker_only: bool = False) -> dict:
    """Read an HF checkpoint directory into our nested param dict of numpy arrays.

    config: OmniConfig / ThinkerConfig / HF config dict (default: the directory's config.json).
    dtype: cast every leaf (e.g. "bfloat16"); None keeps the stored dtype.
    thinker_only: skip talker.* / token2wav.* tensors (and spk_dict.pt) on purpose; without it they are
    reported as unexpected (this build has no talker / token2wav rows yet).
    Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped tensor.
    """
    reader = HFCheckpointReader(hf_dir, config, thinker_only=thinker_only)
    return unflatten_params(dict(reader.iter_leaves(dtype)))


# ================================================================================================ writing

@dataclasses.dataclass
class ExportLeaf:
    rule: Rule
    names: list[str]  # output HF names, one per layer (or one)


def export_plan(config, shapes: Mapping[tuple, tuple], thinker_only: Optional[bool] = None,
                thinker_root: Optional[bool] = None, source: str = "params") -> list[ExportLeaf]:
    """Check our leaf shapes (path -> shape) against the config; return what to write, in order.

    thinker_only (default: the params have no talker / token2wav) restricts the rows to the thinker.
    thinker_root (default: thinker_only or a thinker-only config) writes names without `thinker.`.
    """
    config = as_omni_config(config)
    present_sections = {p[0] for p in shapes}
    if thinker_only is None:
        thinker_only = not any(s in present_sections for s in OPTIONAL_SECTIONS)
    if thinker_root is None:
        thinker_root = thinker_only or config.hf_root == "thinker"
    rows = rules_for(config, thinker_only=thinker_only)
    missing, mismatched, plan = [], [], []
    known = set()
    for rule in rows:
        path = rule.path
        known.add(path)
        if path not in shapes:
            missing.append(("/".join(path), rule.our_shape))
            continue
        if tuple(shapes[path]) != tuple(rule.our_shape):
            mismatched.append(("/".join(path), rule.our_shape, tuple(shapes[path])))
            continue
        plan.append(ExportLeaf(rule, [output_name(n, thinker_root) for n in rule.hf_names()]))
    unexpected = [("/".join(p), s) for p, s in shapes.items() if p not in known]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, sorted(unexpected), mismatched)
    return plan


def leaf_to_hf(leaf: ExportLeaf, value, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, C-contiguous array in the HF layout) for each layer of one of our leaves."""
    value = np.asarray(value)
    out_dtype = dtype_from_name(dtype) if dtype is not None else value.dtype
    inv, hf_shape = leaf.rule.transform.inverse, tuple(leaf.rule.hf_shape)
    if leaf.rule.layers:
        for i, name in enumerate(leaf.names):
            yield name, np.ascontiguousarray(inv(value[i], hf_shape), dtype=out_dtype)
    else:
        yield leaf.names[0], np.ascontiguousarray(inv(value, hf_shape), dtype=out_dtype)


def iter_hf_tensors(params: Mapping, config, dtype=None, thinker_root: Optional[bool] = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Our nested params -> (HF on-disk name, array in the HF layout), one tensor at a time.

    Names are the full-model on-disk names (`thinker.model.layers.0...`) unless the params have no talker /
    token2wav or the config is thinker-only, in which case they are the thinker-only names (`model.layers.0…`,
    what `Qwen2_5OmniThinkerForConditionalGeneration.save_pretrained` writes); `thinker_root` overrides.
    Raises CheckpointMismatchError when the params do not match the config.
    """
    flat = flatten_params(params)
    plan = export_plan(config, {p: np.shape(v) for p, v in flat.items()}, thinker_root=thinker_root)
    for leaf in plan:
        yield from leaf_to_hf(leaf, flat[leaf.rule.path], dtype)


