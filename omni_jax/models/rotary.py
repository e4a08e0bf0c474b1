"""Rotary position embeddings: the thinker/talker's 3-axis M-RoPE (TMRoPE frequencies, spec §7.1)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq_j = theta^(-2j/d) for j < d/2, in float32 as the reference computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def mrope_section_index(mrope_section: Sequence[int]) -> np.ndarray:
    """For each of the d/2 frequency slots, which position axis (0 t, 1 h, 2 w) drives it."""
    return np.concatenate([np.full((n,), i % 3, np.int32) for i, n in enumerate(mrope_section)])


def mrope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int], dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for 3-D positions.

    positions: [3, B, T] int (temporal, height, width rows; equal rows = plain 1-D RoPE).
    Returns cos, sin: [B, T, head_dim] in `dtype`; slot j and j + d/2 share the angle of slot j.
    """
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))  # [d/2]
    axis_of_slot = mrope_section_index(mrope_section)  # [d/2]
    # Pick, per frequency slot, the position row that drives it: [B, T, d/2]
    pos = jnp.take(positions.astype(jnp.float32), jnp.asarray(axis_of_slot), axis=0)  # [d/2, B, T]
    angles = jnp.einsum("jbt,j->btj", pos, inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, d]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, N, d]; cos/sin: [B, T, d]. Half-split rotation (rotate_half), as the reference."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return (x * cos + rotate_half(x) * sin).astype(x.dtype)
