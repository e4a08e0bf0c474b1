"""Generic machinery behind `omni_jax.config`: frozen dataclasses <-> HF config dicts, YAML dicts, overrides.

Every config class derives from `HFConfig`. Field names equal the HF config keys, except

* sub-configs, named without the `_config` suffix (`text` <-> `text_config`, listed in `_SUBCONFIGS`);
* the rope block (`rope_theta`, `rope_type`, `mrope_section`), read from either HF layout:
  transformers-4 (`rope_theta` + `rope_scaling: {mrope_section, rope_type, type}`) or
  transformers-5 (`rope_parameters: {rope_theta, rope_type, mrope_section}`);
* `layer_types` (None = derived from the sliding-window fields, as HF does) and a derived `head_dim`.

Round trip: `from_hf_config` keeps the keys it does not model in `extra` and the source key list in
`hf_keys` (both excluded from eq/hash); `to_hf_config` writes back every source key, plus any modelled
field whose value differs from the default. Configs built from YAML/defaults (`hf_keys is None`) emit every
modelled field in the transformers-5 layout.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Any, ClassVar, Mapping, Optional, Sequence

import yaml


def freeze(value: Any) -> Any:
    """Lists (nested) -> tuples, so configs stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Tuples (nested) -> lists, the JSON/HF representation."""
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def same(a: Any, b: Any) -> bool:
    """Equality that does not confuse bool with int (True == 1)."""
    return isinstance(a, bool) == isinstance(b, bool) and thaw(a) == thaw(b)


def keep(src: Any, new: Any) -> Any:
    """The source value when equal (keeps int vs float as written), else the new one."""
    return src if same(src, new) else new


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


_META = ("extra", "hf_keys", "hf_root")


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """Base of all config dataclasses; see the module docstring."""

    extra: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, repr=False, kw_only=True)
    hf_keys: Optional[tuple] = dataclasses.field(default=None, compare=False, repr=False, kw_only=True)

    _SUBCONFIGS: ClassVar[dict] = {}        # field -> (hf key, class)
    _ALIASES: ClassVar[dict] = {}           # legacy hf key -> field (e.g. DiT "dim" -> hidden_size)
    _ROPE: ClassVar[bool] = False           # has rope_theta / rope_type fields
    _MROPE: ClassVar[bool] = False          # has mrope_section
    _DERIVED_HEAD_DIM: ClassVar[bool] = False  # head_dim None -> hidden_size // num_attention_heads
    _NULLABLE: ClassVar[tuple] = ()         # sub-configs that may be None

    # ----------------------------------------------------------------- construction

    def __post_init__(self):
        for name in self._SUBCONFIGS:
            if getattr(self, name) is None and name not in self._NULLABLE:
                raise self._err(f"{name} must not be null")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, freeze(v))
        object.__setattr__(self, "extra", types.MappingProxyType(copy.deepcopy(dict(self.extra))))
        if self._DERIVED_HEAD_DIM and getattr(self, "head_dim") is None:
            object.__setattr__(self, "head_dim", self.derived_head_dim)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (naming the field and values) if the config is inconsistent."""

    def _err(self, msg: str) -> ValueError:
        return ValueError(f"{type(self).__name__}: {msg}")

    @property
    def derived_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads  # type: ignore[attr-defined]

    def derived_layer_types(self) -> tuple:
        """HF's rule: sliding attention for layers >= max_window_layers when use_sliding_window."""
        sliding = self.use_sliding_window and self.sliding_window is not None  # type: ignore[attr-defined]
        return tuple("sliding_attention" if sliding and i >= self.max_window_layers else "full_attention"  # type: ignore[attr-defined]
                     for i in range(self.num_hidden_layers))  # type: ignore[attr-defined]

    @classmethod
    def _special(cls) -> set:
        names = set(_META) | set(cls._SUBCONFIGS) | {"layer_types"}
        if cls._ROPE:
            names |= {"rope_theta", "rope_type", "mrope_section"}
        if cls._DERIVED_HEAD_DIM:
            names.add("head_dim")
        return names

    @classmethod
    def _plain_fields(cls) -> list:
        special = cls._special()
        return [f for f in dataclasses.fields(cls) if f.name not in special]

    @classmethod
    def _field_defaults(cls) -> dict:
        return {f.name: _default(f) for f in dataclasses.fields(cls) if f.name not in _META}

    # ----------------------------------------------------------------- HF dicts

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]):
        """Build from an HF config dict (transformers-4 or -5 layout); unknown keys go to `extra`."""
        kw: dict = {}
        used: set = set()
        names = {f.name for f in dataclasses.fields(cls)}
        for f in cls._plain_fields():
            if f.name in d:
                kw[f.name] = freeze(d[f.name])
                used.add(f.name)
        for name, (key, sub) in cls._SUBCONFIGS.items():
            if key in d:
                kw[name] = None if d[key] is None else sub.from_hf_config(d[key])
                used.add(key)
        for alias, name in cls._ALIASES.items():
            if alias in d and (name not in kw or same(d[alias], kw[name])):
                kw.setdefault(name, freeze(d[alias]))
                used.add(alias)
        if cls._DERIVED_HEAD_DIM and "head_dim" in d and d["head_dim"] is not None:
            kw["head_dim"] = d["head_dim"]
            used.add("head_dim")
        if cls._ROPE:
            cls._parse_rope(d, kw, used)
        if "layer_types" in names and d.get("layer_types") is not None:
            kw["layer_types"] = freeze(d["layer_types"])
            used.add("layer_types")
        extra = {k: v for k, v in d.items() if k not in used}
        cfg = cls(**kw, extra=extra, hf_keys=tuple(d))
        if cfg_layer_types_derived(cfg):  # store "derived" so overrides of num_hidden_layers stay consistent
            cfg = dataclasses.replace(cfg, layer_types=None)
        return cfg

    @classmethod
    def _parse_rope(cls, d: Mapping[str, Any], kw: dict, used: set) -> None:
        if "rope_theta" in d:
            kw["rope_theta"] = d["rope_theta"]
            used.add("rope_theta")
        for key in ("rope_scaling", "rope_parameters"):  # rope_parameters wins; both dicts stay in extra
            src = d.get(key)
            if isinstance(src, Mapping):
                if "rope_theta" in src:
                    kw["rope_theta"] = src["rope_theta"]
                if "rope_type" in src or "type" in src:
                    kw["rope_type"] = src.get("rope_type", src.get("type"))
                if cls._MROPE and src.get("mrope_section") is not None:
                    kw["mrope_section"] = freeze(src["mrope_section"])

    def to_hf_config(self) -> dict:
        """The HF config dict; exact inverse of `from_hf_config` for an unmodified config."""
        fresh = self.hf_keys is None
        src = set(self.hf_keys or ())
        defaults = self._field_defaults()
        out = copy.deepcopy(dict(self.extra))

        def emit(key: str, value: Any, default: Any) -> None:
            if fresh or key in src or not same(value, default):
                out[key] = keep(out[key], value) if key in out else thaw(value)

        for f in self._plain_fields():
            emit(f.name, getattr(self, f.name), defaults[f.name])
        for name, (key, _) in self._SUBCONFIGS.items():
            sub = getattr(self, name)
            if fresh or key in src or sub != defaults[name]:
                out[key] = None if sub is None else sub.to_hf_config()
        for alias, name in self._ALIASES.items():
            if alias in src and alias not in self.extra:
                out[alias] = thaw(getattr(self, name))
        explicit_head_dim = "head_dim" in src and "head_dim" not in self.extra
        if self._DERIVED_HEAD_DIM and (explicit_head_dim or self.head_dim != self.derived_head_dim):  # type: ignore[attr-defined]
            out["head_dim"] = self.head_dim  # type: ignore[attr-defined]
        if self._ROPE:
            self._emit_rope(out, src, fresh, defaults)
        if "layer_types" in defaults:
            lt = getattr(self, "layer_types")
            if lt is not None or (not fresh and "layer_types" in src and "layer_types" not in self.extra):
                out["layer_types"] = thaw(lt if lt is not None else self.derived_layer_types())
        order = [k for k in (self.hf_keys or ()) if k in out]
        return {k: out[k] for k in order + [k for k in out if k not in src]}

    def _emit_rope(self, out: dict, src: set, fresh: bool, defaults: dict) -> None:
        theta, rtype = self.rope_theta, self.rope_type  # type: ignore[attr-defined]
        mrope = thaw(self.mrope_section) if self._MROPE else None  # type: ignore[attr-defined]
        if fresh:
            out["rope_parameters"] = {"rope_theta": theta, "rope_type": rtype}
            if mrope is not None:
                out["rope_parameters"]["mrope_section"] = mrope
            return
        placed = {"theta": False, "type": False, "mrope": mrope is None}
        if "rope_theta" in src:
            out["rope_theta"] = keep(out.get("rope_theta"), theta)
            placed["theta"] = True
        rope_dicts = [out[k] for k in ("rope_parameters", "rope_scaling") if isinstance(out.get(k), dict)]
        for rd in rope_dicts:
            for key, what, value in (("rope_theta", "theta", theta), ("rope_type", "type", rtype),
                                     ("type", "type", rtype), ("mrope_section", "mrope", mrope)):
                if key in rd and value is not None:
                    rd[key], placed[what] = keep(rd[key], value), True
        target = rope_dicts[0] if rope_dicts else None
        if not placed["theta"] and not same(theta, defaults["rope_theta"]):
            (target if target is not None and "rope_parameters" in out else out)["rope_theta"] = theta
        changed_type = not placed["type"] and not same(rtype, defaults["rope_type"])
        changed_mrope = not placed["mrope"] and not same(mrope, defaults["mrope_section"])
        if changed_type or changed_mrope:
            if target is None:
                target = out["rope_scaling"] = {"rope_type": rtype, "type": rtype}
            target.setdefault("rope_type", rtype)
            if mrope is not None:
                target["mrope_section"] = mrope

    # ----------------------------------------------------------------- plain (YAML) dicts

    def to_dict(self) -> dict:
        """Every modelled field, nested like the HF dict (`thinker_config`, `text_config`, ...)."""
        out: dict = {"model_type": getattr(self, "model_type")} if hasattr(self, "model_type") else {}
        subs = {name: key for name, (key, _) in self._SUBCONFIGS.items()}
        for f in dataclasses.fields(self):
            if f.name in _META:
                continue
            v = getattr(self, f.name)
            if f.name in subs:
                out[subs[f.name]] = None if v is None else v.to_dict()
            else:
                out[f.name] = thaw(v)
        return out

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]], path: str = ""):
        """Build from a (possibly partial) plain dict; missing keys take the defaults, unknown keys raise."""
        d = dict(d or {})
        valid = {f.name for f in dataclasses.fields(cls) if f.name not in _META}
        kw: dict = {}
        for key, value in d.items():
            name = _field_name(cls, key)
            where = f"{path}{key}"
            if name not in valid:
                raise ValueError(f"{where}: unknown key for {cls.__name__}; valid keys: {sorted(valid)}")
            if name in cls._SUBCONFIGS:
                kw[name] = None if value is None else cls._SUBCONFIGS[name][1].from_dict(value, where + ".")
            else:
                kw[name] = coerce(cls, name, value, where)
        if cls._DERIVED_HEAD_DIM and "head_dim" not in kw:
            kw["head_dim"] = None
        return cls(**kw)


def cfg_layer_types_derived(cfg: HFConfig) -> bool:
    lt = getattr(cfg, "layer_types", None)
    return lt is not None and tuple(lt) == cfg.derived_layer_types()


def _field_name(cls, key: str) -> str:
    """Accept both `text_config` (HF) and `text` (field) for sub-configs."""
    for name, (hf_key, _) in cls._SUBCONFIGS.items():
        if key == hf_key:
            return name
    return key


def coerce(cls, name: str, value: Any, where: str) -> Any:
    """Light type check/conversion of a YAML or CLI value against the field's default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = _default(f)
    if "Any" in str(f.type):  # e.g. eos_token_id: an int or a list of ints
        pass
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
    elif isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    elif isinstance(default, int) and not isinstance(value, int) and value is not None:
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    return freeze(value)


# --------------------------------------------------------------------- overrides

def parse_overrides(overrides: Sequence[str]) -> dict:
    """["a.b=1", "c=[1,2]"] -> {"a.b": 1, "c": [1, 2]} (values parsed with yaml.safe_load)."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def apply_overrides(cfg, overrides):
    """Return `cfg` with dotted overrides applied: a list of "key=value" strings or a {dotted: value} map.

    Works on any config dataclass (OmniConfig, RuntimeOptions, ...). `thinker.text.num_hidden_layers` and
    `thinker_config.text_config.num_hidden_layers` both work. A derived head_dim (== hidden // heads) is
    re-derived when hidden_size or num_attention_heads change and head_dim is not overridden.
    """
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    tree: dict = {}
    for dotted, value in overrides.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r} conflicts with another override")
        node[parts[-1]] = value
    return _apply(cfg, tree, "")


def _apply(obj, tree: dict, path: str):
    cls = type(obj)
    subs = getattr(cls, "_SUBCONFIGS", {})
    valid = {f.name for f in dataclasses.fields(obj) if f.name not in _META}
    grouped: dict = {}  # field name -> value; `text` and `text_config` branches are merged
    for key, value in tree.items():
        name = _field_name(cls, key) if subs else key
        where = f"{path}{key}"
        if name not in valid:
            raise ValueError(f"override {where}: unknown field of {cls.__name__}; valid: {sorted(valid)}")
        if isinstance(grouped.get(name), dict) and isinstance(value, dict):
            grouped[name] = {**grouped[name], **value}
        elif name in grouped:
            raise ValueError(f"override {where}: set twice")
        else:
            grouped[name] = value
    kw: dict = {}
    for name, value in grouped.items():
        where = f"{path}{name}"
        if name in subs:
            sub_cls = subs[name][1]
            current = getattr(obj, name)
            if isinstance(value, dict):
                kw[name] = _apply(current if current is not None else sub_cls(), value, where + ".")
            elif value is None:
                kw[name] = None
            else:
                raise ValueError(f"override {where}: expected a mapping or null, got {value!r}")
        else:
            kw[name] = coerce(cls, name, value, where)
    if getattr(cls, "_DERIVED_HEAD_DIM", False) and "head_dim" not in kw and (
            "hidden_size" in kw or "num_attention_heads" in kw) and obj.head_dim == obj.derived_head_dim:
        kw["head_dim"] = None
    try:
        return dataclasses.replace(obj, **kw)
    except ValueError as e:
        raise ValueError(f"{path.rstrip('.') or cls.__name__}: {e}") from None
