"""Voices (speakers): HF `spk_dict.pt` in, a torch-free `speakers.safetensors` + `speakers.json` in our checkpoints.

A voice is the DiT conditioning `cond` [enc_emb_dim], a reference mel `ref_mel` [T_ref, mel] (through ECAPA)
and `bos_token`, the thinker vocabulary id the talker is fed before the reply (spec §9.1).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

SPK_DICT = "spk_dict.pt"
VOICES_TENSORS = "speakers.safetensors"
VOICES_INDEX = "speakers.json"


@dataclasses.dataclass(frozen=True)
class Voice:
    """A speaker: `cond` [enc_emb_dim] speaker vector, `ref_mel` [T_ref, mel] reference mel, `bos_token` (a
    thinker vocabulary id fed to the talker before the reply). Build your own for voice research."""

    cond: np.ndarray
    ref_mel: np.ndarray
    bos_token: int

    def __post_init__(self):
        cond = np.asarray(self.cond, np.float32).reshape(-1)
        ref = np.asarray(self.ref_mel, np.float32)
        ref = ref.reshape(ref.shape[-2], ref.shape[-1]) if ref.ndim == 3 else ref
        if ref.ndim != 2:
            raise ValueError(f"ref_mel must be [T, mel] (or [1, T, mel]), got shape {np.shape(self.ref_mel)}")
        object.__setattr__(self, "cond", cond)
        object.__setattr__(self, "ref_mel", ref)
        object.__setattr__(self, "bos_token", int(self.bos_token))


def resolve_voice(speakers: Mapping[str, Voice], speaker) -> Voice:
    """A Voice by name (an unknown name is an error listing the known ones) or a caller's own Voice."""
    if isinstance(speaker, Voice):
        return speaker
    if speaker not in speakers:
        known = ", ".join(sorted(speakers)) or "none (this checkpoint has no speakers)"
        raise ValueError(f"unknown speaker {speaker!r}; known speakers: {known}")
    return speakers[speaker]


def read_spk_dict(path: str) -> dict[str, Voice]:
    """HF's spk_dict.pt (a torch pickle of {name: {cond, ref_mel, bos_token}}); needs torch."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test extra
        raise ImportError(f"reading {path} needs PyTorch (pip install torch==2.13.0, the CPU wheel)") from e
    data = torch.load(path, map_location="cpu", weights_only=True)
    voices = {}
    for name, entry in data.items():
        missing = {"cond", "ref_mel", "bos_token"} - set(entry)
        if missing:
            raise ValueError(f"{path}: speaker {name!r} lacks {sorted(missing)}")
        voices[name] = Voice(entry["cond"].float().numpy(), entry["ref_mel"].float().numpy(), int(entry["bos_token"]))
    return voices


def write_voices(directory: str, voices: Mapping[str, Voice]) -> None:
    """speakers.safetensors (cond, ref_mel per name) + speakers.json (bos tokens)."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, v in voices.items():
        tensors[f"{name}.cond"] = v.cond
        tensors[f"{name}.ref_mel"] = v.ref_mel
    save_file(tensors, os.path.join(directory, VOICES_TENSORS))
    with open(os.path.join(directory, VOICES_INDEX), "w") as f:
        json.dump({name: {"bos_token": v.bos_token} for name, v in voices.items()}, f, indent=2)


def read_voices(directory: str) -> dict[str, Voice]:
    """Voices of an omni_jax checkpoint dir, or of an HF dir (spk_dict.pt); {} when there are none."""
    index = os.path.join(directory, VOICES_INDEX)
    if os.path.exists(index):
        from safetensors.numpy import load_file

        tensors = load_file(os.path.join(directory, VOICES_TENSORS))
        with open(index) as f:
            meta = json.load(f)
        return {name: Voice(tensors[f"{name}.cond"], tensors[f"{name}.ref_mel"], m["bos_token"])
                for name, m in meta.items()}
    if os.path.exists(os.path.join(directory, SPK_DICT)):
        return read_spk_dict(os.path.join(directory, SPK_DICT))
    return {}


def write_spk_dict(path: str, voices: Mapping[str, Voice]) -> None:
    """Back to HF's spk_dict.pt (for export); needs torch."""
    import torch

    torch.save({name: {"cond": torch.from_numpy(v.cond), "ref_mel": torch.from_numpy(v.ref_mel[None]),
                       "bos_token": v.bos_token} for name, v in voices.items()}, path)
