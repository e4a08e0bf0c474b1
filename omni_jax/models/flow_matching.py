"""Flow-matching sampler of Token2Wav: codec ids -> mel (HF `Qwen2_5OmniToken2WavDiTModel.sample`), spec §9.3.

    dit = DiT(config)
    noise = make_noise(key, codes.shape[0], codes.shape[1], config)          # [B, repeats·n, mel]
    mel = sample_mel(dit.apply, {"params": params}, codes, cond, ref_mel, noise)  # [B, mel, repeats·n]

* Time points: τ = linspace(0, 1, num_steps) warped by t = τ + s·(cos(πτ/2) − 1 + τ) (s = sway_coefficient;
  1 − cos(πτ/2) for s = −1), in float32 exactly as torch computes them (`time_points`).
* Each of the num_steps − 1 intervals is one 3/8-rule RK4 step (HF `RungeKutta4ODESolver`):
  k1 = f(t0, y); k2 = f(t0 + h/3, y + h·k1/3); k3 = f(t0 + 2h/3, y + h(k2 − k1/3)); k4 = f(t1, y + h(k1 − k2 + k3));
  y += (k1 + 3(k2 + k3) + k4)·h/8. The steps run in one `lax.scan` (one compiled step, no Python loop).
* Guidance: f = v_c + g·(v_c − v_u), both from one DiT call on the doubled batch (`apply_cfg=True`); for
  g < 1e-5 a single conditional call (as HF).
* The start noise is an explicit input (HF draws it with torch.randn, so parity needs it injected).
* Length buckets: pad codes / noise to a bucket length and pass `frame_mask` (1 = real frame); the DiT then
  gives padded frames no attention weight, so the real frames' mel is the unpadded one (up to float rounding)
  and one compiled sampler serves every length in the bucket.

`sample_mel` is jitted with `dit_apply` static: keep one `DiT` instance and pass its `.apply` to reuse the
compiled sampler (bound methods of the same instance compare equal; a new instance compiles again).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import DiTConfig

__all__ = ["time_points", "make_noise", "sample_mel", "rk4_step"]

CFG_MIN_SCALE = 1e-5  # HF: guidance_scale below this skips the unconditional branch


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: the first half counts up from start, the second half down from end."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    out = np.where(idx < half,
                   np.float32(start) + step * idx.astype(np.float32),
                   np.float32(end) - step * (steps - 1 - idx).astype(np.float32))
    return out.astype(np.float32)


def time_points(num_steps: int, sway_coefficient: float | None = -1.0) -> np.ndarray:
    """[num_steps] float32 ODE time points in [0, 1] (linspace warped by the sway rule), as HF computes them."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 (one ODE interval), got {num_steps}")
    t = _torch_linspace_f32(0.0, 1.0, num_steps)
    if sway_coefficient is not None:
        warp = np.cos(np.float32(np.pi / 2) * t).astype(np.float32) - np.float32(1) + t
        t = (t + np.float32(sway_coefficient) * warp).astype(np.float32)
    return t


def make_noise(key: jax.Array, batch: int, num_codes: int, config: DiTConfig) -> jax.Array:
    """Start state x0 ~ N(0, 1): [batch, repeats·num_codes, mel_dim] float32."""
    return jax.random.normal(key, (batch, config.repeats * num_codes, config.mel_dim), jnp.float32)


def rk4_step(f: Callable, t0: jax.Array, t1: jax.Array, y: jax.Array) -> jax.Array:
    """One 3/8-rule RK4 step from t0 to t1; returns y(t1). Operation order as HF's `_rk4_step`."""
    third, two_thirds = jnp.float32(1 / 3), jnp.float32(2 / 3)
    h = t1 - t0
    k1 = f(t0, y)
    k2 = f(t0 + h * third, y + h * k1 * third)
    k3 = f(t0 + h * two_thirds, y + h * (k2 - k1 * third))
    k4 = f(t1, y + h * (k1 - k2 + k3))
    return y + (k1 + 3 * (k2 + k3) + k4) * h / 8


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("num_steps", "guidance_scale", "sway_coefficient", "return_trajectory"))
def sample_mel(
    dit_apply: Callable,
    params,
    codes: jax.Array,  # [B, n] int
    cond: jax.Array,  # [B, enc_emb_dim] speaker vector
    ref_mel: jax.Array,  # [B, T_ref, mel]
    noise: jax.Array,  # [B, repeats·n, mel] start state
    num_steps: int = 10,
    guidance_scale: float = 0.5,
    sway_coefficient: float | None = -1.0,
    return_trajectory: bool = False,
    frame_mask: jax.Array | None = None,  # [B, T] 1 = real frame (length buckets: padded frames are not attended)
):
    """Integrate the guided velocity field from t = 0 (noise) to t = 1.

    dit_apply(params, x, codes, cond, ref_mel, t, apply_cfg=...) is `DiT(config).apply`; params its variables.
    Returns mel [B, mel, T] (T = repeats·n), and with return_trajectory also the ODE states at every time point,
    [num_steps, B, T, mel] (index 0 = the noise, as HF's `solution_trajectory`).
    """
    batch = noise.shape[0]
    if codes.shape[0] != batch or cond.shape[0] != batch or ref_mel.shape[0] != batch:
        raise ValueError(f"codes, cond, ref_mel and noise must share the batch size; got {codes.shape[0]}, "
                         f"{cond.shape[0]}, {ref_mel.shape[0]}, {batch}")
    guided = guidance_scale >= CFG_MIN_SCALE
    masked = {} if frame_mask is None else {"frame_mask": frame_mask}

    def velocity(t, y):
        if not guided:
            return dit_apply(params, y, codes, cond, ref_mel, t, **masked)
        v = dit_apply(params, y, codes, cond, ref_mel, t, apply_cfg=True, **masked)  # [2B, T, mel]
        v_cond, v_uncond = v[:batch], v[batch:]
        return v_cond + (v_cond - v_uncond) * jnp.float32(guidance_scale)

    t = jnp.asarray(time_points(num_steps, sway_coefficient))  # [num_steps]

    def step(y, interval):
        y_next = rk4_step(velocity, interval[0], interval[1], y)
        return y_next, (y_next if return_trajectory else None)

    y0 = noise.astype(jnp.float32)
    final, states = jax.lax.scan(step, y0, jnp.stack([t[:-1], t[1:]], axis=-1))
    mel = jnp.transpose(final, (0, 2, 1))
    if return_trajectory:
        return mel, jnp.concatenate([y0[None], states], axis=0)
    return mel
