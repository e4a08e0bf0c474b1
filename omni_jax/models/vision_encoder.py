"""Vision encoder (spec §5): a ViT with 2-D axial RoPE, window attention, full attention per frame in a few
blocks, and a 2x2 patch merger.

Two halves:
  * `plan_vision` (host, numpy) turns `grid_thw` into everything that depends only on the grids: the window
    permutation, the window / frame segment ids, the rotary (row, col) positions and the inverse permutation,
    optionally padded to a fixed number of patches (a "bucket") so that many inputs share one compiled shape.
  * `VisionEncoder` (Flax) runs the network on `pixel_values` given those arrays.

    plan = plan_vision(image_grid_thw, config.vision, num_patches_bucket=4096)
    merged = VisionEncoder(config.vision, options).apply(params, plan.pad_pixel_values(pixel_values), plan.arrays)
    image_embeds = plan.unpad(merged)               # [Σ t·h·w / 4, out_hidden_size], processor order

Sequence layout inside the model (spec §5.4): patches come in the processor's merge-block-major order; the
model permutes them, in groups of `spatial_merge_size**2` consecutive patches (one merged token), into window
order: per frame, windows of `window_size / merge / patch` merged tokens per side, row-major, and row-major
inside a window. Every window is one attention segment; the blocks in `fullatt_block_indexes` attend within
each frame (one (item, temporal grid) pair) instead. Bucket padding has segment id 0 in both: it attends to
nothing, nothing attends to it, and it sits after all real patches so it is dropped by slicing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import REMAT_POLICIES
from omni_jax.models.attention import AttentionMask, attention
from omni_jax.models.layers import Einsum, RMSNorm, constrain
from omni_jax.models.rotary import inverse_frequencies, rotate_half

ACT_LENGTH, ACT_EMBED, ACT_PACKED = "activation_length", "activation_embed", "activation_packed"
# The vision sequence is one flat packed sequence (batch 1) of every item of the batch: its positions are sharded
# over the batch devices (ACT_PACKED), so the projections and MLPs of each patch run on one device, with the
# weights gathered (FSDP). Attention takes q/k/v whole (the block-sparse kernel skips the pairs of different
# windows / frames). With the positions replicated, every device encoded every patch and the compiler all-reduced
# each layer's activations over the weight shards: ~1.4 TB per chip per step for the multimodal 7B preset.
_SEQ_AXES = (None, ACT_PACKED, ACT_EMBED)

_ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


# ================================================================================================ host plan


@flax.struct.dataclass
class VisionPlanArrays:
    """The device-side plan; every shape depends only on the (padded) number of patches N (U = N / merge²)."""

    window_index: Any  # [U] int32: window-order position u holds merged token window_index[u] (processor order)
    inverse_window_index: Any  # [U] int32: argsort(window_index), restores processor order after the merger
    window_segment_ids: Any  # [N] int32, window order: one id (1, 2, ...) per attention window; 0 = padding
    frame_segment_ids: Any  # [N] int32, window order: one id per (item, temporal grid) frame; 0 = padding
    rotary_positions: Any  # [N, 2] int32, window order: (row, col) of each patch within its frame


@dataclasses.dataclass(frozen=True)
class VisionPlan:
    """Host-side description of one vision batch (images or videos), built by `plan_vision`."""

    grid_thw: np.ndarray  # [n_items, 3] (t, h, w) in patches
    num_patches: int  # Σ t·h·w real patches
    num_patches_padded: int  # N, the length the model runs on (>= num_patches)
    merge_unit: int  # spatial_merge_size ** 2 patches per merged token
    arrays: VisionPlanArrays

    @property
    def num_tokens(self) -> int:
        """Real merged tokens (rows of the encoder output that matter)."""
        return self.num_patches // self.merge_unit

    @property
    def tokens_per_item(self) -> list[int]:
        return [int(t * h * w) // self.merge_unit for t, h, w in self.grid_thw]

    def pad_pixel_values(self, pixel_values):
        """[num_patches, D] -> [num_patches_padded, D], zero rows appended (numpy or jax)."""
        if pixel_values.shape[0] != self.num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw "
                             f"{self.grid_thw.tolist()} describes {self.num_patches}")
        extra = self.num_patches_padded - self.num_patches
        if extra == 0:
            return pixel_values
        xp = np if isinstance(pixel_values, np.ndarray) else jnp
        return xp.concatenate([pixel_values, xp.zeros((extra,) + tuple(pixel_values.shape[1:]),
                                                      pixel_values.dtype)], axis=0)

    def unpad(self, merged):
        """Encoder output [num_patches_padded / merge_unit, out] -> the real tokens [num_tokens, out]."""
        return merged[: self.num_tokens]

    def split(self, merged) -> list:
        """Encoder output -> one [tokens_i, out] array per image / video, in grid_thw order."""
        bounds = np.cumsum([0] + self.tokens_per_item)
        return [merged[int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:])]


def _validate_grid(grid_thw, merge: int) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [n_items, 3] (t, h, w), got {list(grid.shape)}")
    if grid.shape[0] == 0:
        raise ValueError("grid_thw is empty: no image or video to encode")
    if not np.issubdtype(grid.dtype, np.integer):
        if not np.all(grid == np.round(grid)):
            raise ValueError(f"grid_thw must hold integers, got {grid.tolist()}")
    grid = grid.astype(np.int64)
    for item, (t, h, w) in enumerate(grid.tolist()):
        if t <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"grid_thw[{item}] = {(t, h, w)}: t, h and w must be positive")
        if h % merge or w % merge:
            raise ValueError(f"grid_thw[{item}] = {(t, h, w)}: h and w must be divisible by "
                             f"spatial_merge_size {merge}")
    return grid


def plan_vision(grid_thw, config, num_patches_bucket: Optional[int] = None) -> VisionPlan:
    """Everything the encoder needs that depends only on the grids (spec §5.2, §5.4).

    grid_thw: [n_items, 3] (t, h, w) in patches, as `image_grid_thw` / `video_grid_thw`.
    config: `VisionEncoderConfig` (uses spatial_merge_size, window_size, patch_size).
    num_patches_bucket: pad the sequence to exactly this many patches (a multiple of spatial_merge_size**2, at
        least Σ t·h·w) so that differently sized inputs share one compiled shape; None = no padding.
    """
    merge = int(config.spatial_merge_size)
    unit = merge * merge
    window = int(config.window_size) // merge // int(config.patch_size)  # window side in merged tokens
    if window <= 0:
        raise ValueError(f"window_size {config.window_size} is smaller than one merged token "
                         f"({merge} x {config.patch_size} px)")
    grid = _validate_grid(grid_thw, merge)

    window_index, window_seg, frame_seg, rows, cols = [], [], [], [], []
    unit_offset = 0  # merged tokens of the previous items
    windows_so_far = 0
    frames_so_far = 0
    for t, h, w in grid.tolist():
        mh, mw = h // merge, w // merge  # merged grid of one frame
        win_rows, win_cols = -(-mh // window), -(-mw // window)  # ceil: every such window is non-empty
        r, c = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)  # processor (row-major) order of the merged tokens
        win = (r // window) * win_cols + (c // window)  # window of each merged token, row-major windows
        order = np.lexsort((c, r, win))  # window order: by window, then row-major inside the window
        per_frame = mh * mw
        frame_offsets = np.arange(t)[:, None] * per_frame  # [t, 1]
        window_index.append((unit_offset + frame_offsets + order[None, :]).reshape(-1))
        frame_windows = win_rows * win_cols
        window_seg.append((windows_so_far + 1 + np.arange(t)[:, None] * frame_windows + win[order][None, :])
                          .reshape(-1))
        frame_seg.append(np.repeat(frames_so_far + 1 + np.arange(t), per_frame))
        # Patch (row, col) inside the frame for every merged token (in window order) and inner (ih, iw).
        ih, iw = np.divmod(np.arange(unit), merge)
        patch_rows = (r[order][:, None] * merge + ih[None, :]).reshape(-1)
        patch_cols = (c[order][:, None] * merge + iw[None, :]).reshape(-1)
        rows.append(np.tile(patch_rows, t))
        cols.append(np.tile(patch_cols, t))
        unit_offset += t * per_frame
        windows_so_far += t * frame_windows
        frames_so_far += t

    num_units = unit_offset
    num_patches = num_units * unit
    padded = num_patches if num_patches_bucket is None else int(num_patches_bucket)
    if padded < num_patches:
        raise ValueError(f"num_patches_bucket {padded} is smaller than the {num_patches} patches of grid_thw "
                         f"{grid.tolist()}")
    if padded % unit:
        raise ValueError(f"num_patches_bucket {padded} must be a multiple of spatial_merge_size**2 = {unit}")
    pad_units, pad_patches = padded // unit - num_units, padded - num_patches

    window_index = np.concatenate(window_index + [np.arange(num_units, num_units + pad_units)])
    window_seg = np.concatenate(window_seg)
    frame_seg = np.concatenate(frame_seg)
    arrays = VisionPlanArrays(
        window_index=window_index.astype(np.int32),
        inverse_window_index=np.argsort(window_index, kind="stable").astype(np.int32),
        window_segment_ids=np.concatenate([np.repeat(window_seg, unit), np.zeros(pad_patches)]).astype(np.int32),
        frame_segment_ids=np.concatenate([np.repeat(frame_seg, unit), np.zeros(pad_patches)]).astype(np.int32),
        rotary_positions=np.stack([np.concatenate(rows + [np.zeros(pad_patches)]),
                                   np.concatenate(cols + [np.zeros(pad_patches)])], axis=-1).astype(np.int32),
    )
    return VisionPlan(grid_thw=grid, num_patches=num_patches, num_patches_padded=padded, merge_unit=unit,
                      arrays=arrays)


# ================================================================================================ model


def axial_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D axial RoPE tables (spec §5.3), float32.

    positions [N, 2] (row, col) -> cos, sin [N, head_dim]: angles = cat(row·f, col·f) with
    f_j = theta^(-2j/(head_dim/2)) for j < head_dim/4, duplicated to head_dim (cat(a, a)).
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim // 2, theta))  # [d/4]
    pos = positions.astype(jnp.float32)
    angles = jnp.concatenate([pos[:, 0:1] * inv_freq, pos[:, 1:2] * inv_freq], axis=-1)  # [N, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [N, d]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, N, H, d]; cos/sin [N, d] float32. Rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


class VisionAttention(nn.Module):
    """Multi-head self-attention with q/k/v/proj biases and axial RoPE on q and k."""

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    platform: str = "auto"  # the program's target (omni_jax.kernels.target)

    @nn.compact
    def __call__(self, x, cos, sin, mask: AttentionMask):
        """x [1, N, C] -> [1, N, C]."""
        C, H = self.hidden_size, self.num_heads
        d = C // H
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)

        def project(name):
            return Einsum("btc,cnh->btnh", (C, H, d), ("embed", "heads", "head_dim"), (H, d), ("heads", "head_dim"),
                          name=name, **kw)(x)

        head_axes = (None, ACT_LENGTH, "activation_heads", None)
        q = constrain(_rotate(project("q"), cos, sin), head_axes)  # [1, N, H, d]
        k = constrain(_rotate(project("k"), cos, sin), head_axes)
        v = constrain(project("v"), head_axes)
        out = attention(q, k, v, mask, scale=d**-0.5, backend=self.attention_backend,
                        platform=self.platform)  # [1, N, H, d]
        return Einsum("btnh,nhc->btc", (H, d, C), ("heads", "head_dim", "embed"), (C,), ("embed",),
                      name="proj", **kw)(out)


class VisionMLP(nn.Module):
    """down(act(gate(x)) * up(x)), all with biases."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str = "auto"

    @nn.compact
    def __call__(self, x):
        C, F = self.hidden_size, self.intermediate_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        gate = Einsum("btc,cf->btf", (C, F), ("embed", "mlp"), (F,), ("mlp",), name="gate_proj", **kw)(x)
        up = Einsum("btc,cf->btf", (C, F), ("embed", "mlp"), (F,), ("mlp",), name="up_proj", **kw)(x)
        act = constrain(_ACTIVATIONS[self.hidden_act](gate) * up, (None, ACT_PACKED, "activation_mlp"))
        return Einsum("btf,fc->btc", (F, C), ("mlp", "embed"), (C,), ("embed",), name="down_proj", **kw)(act)


class VisionBlock(nn.Module):
    """x + proj(Attn(RMSNorm(x))), then + MLP(RMSNorm(x)); the scanned body of the encoder."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "xla"
    platform: str = "auto"

    @nn.compact
    def __call__(self, x, full_attention, cos, sin, window_segment_ids, frame_segment_ids):
        """x [1, N, C]; full_attention: scalar bool (this layer's flag, scanned); segment ids [N]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        segment_ids = jnp.where(full_attention, frame_segment_ids, window_segment_ids)[None, :]  # [1, N]
        slots = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
        mask = AttentionMask(segment_ids, segment_ids, slots, slots, causal=False)

        h = RMSNorm(self.hidden_size, 1e-6, name="norm1", **kw)(x)
        x = x + VisionAttention(self.hidden_size, self.num_heads, attention_backend=self.attention_backend,
                                platform=self.platform, name="attn", **kw)(h, cos, sin, mask)
        x = constrain(x, _SEQ_AXES)
        h = RMSNorm(self.hidden_size, 1e-6, name="norm2", **kw)(x)
        x = x + VisionMLP(self.hidden_size, self.intermediate_size, self.hidden_act, platform=self.platform,
                          name="mlp", **kw)(h)
        return constrain(x, _SEQ_AXES), None


class PatchMerger(nn.Module):
    """RMSNorm per patch -> concat each group of merge² consecutive patches -> Linear -> GELU(erf) -> Linear."""

    hidden_size: int
    out_hidden_size: int
    merge_unit: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str = "auto"

    @nn.compact
    def __call__(self, x):
        """x [1, N, C] (window order) -> [1, N / merge², out] (window order)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        C, out = self.hidden_size, self.out_hidden_size
        G = C * self.merge_unit
        x = RMSNorm(C, 1e-6, name="ln_q", **kw)(x)
        x = x.reshape(x.shape[0], x.shape[1] // self.merge_unit, G)  # [1, U, merge²·C]
        x = Einsum("btg,gf->btf", (G, G), ("embed", "mlp"), (G,), ("mlp",), name="mlp_0", platform=self.platform,
                   **kw)(x)
        x = nn.gelu(x, approximate=False)
        return Einsum("btf,fo->bto", (G, out), ("mlp", "embed"), (out,), ("embed",), name="mlp_2",
                      platform=self.platform, **kw)(x)


class VisionEncoder(nn.Module):
    """Qwen2.5-Omni ViT: patch embed, `depth` scanned blocks (window / per-frame attention), merger.

    Params: patch_embed/kernel, blocks/{norm1,norm2,attn/{q,k,v,proj},mlp/{gate_proj,up_proj,down_proj}}
    stacked on a leading `layers` axis, merger/{ln_q,mlp_0,mlp_2}.
    """

    config: Any  # omni_jax.config.VisionEncoderConfig
    options: Any  # omni_jax.config.RuntimeOptions

    @nn.compact
    def __call__(self, pixel_values: jax.Array, plan: VisionPlanArrays) -> jax.Array:
        """pixel_values [N, in_channels·temporal_patch·patch²] (processor order, padded to the plan's N)
        -> merged tokens [N / merge², out_hidden_size] in processor order (bucket padding rows last)."""
        cfg = self.config
        dtype, param_dtype = jnp.dtype(self.options.dtype), jnp.dtype(self.options.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        C = cfg.hidden_size
        unit = cfg.spatial_merge_size ** 2
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        num_patches = plan.window_segment_ids.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {patch_dim}] (in_channels * temporal_patch_size "
                             f"* patch_size**2), got {list(pixel_values.shape)}")
        if pixel_values.shape[0] != num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but the vision plan has "
                             f"{num_patches}; pad with VisionPlan.pad_pixel_values")

        # Patch embed: the Conv3d with kernel = stride is one matmul over the flattened (c, t, py, px) patch.
        x = Einsum("btp,pc->btc", (patch_dim, C), (None, "embed"), name="patch_embed", platform=self.options.platform,
                   **kw)(
            pixel_values[None])  # [1, N, C]
        # Processor order -> window order, moving whole merged tokens (groups of merge² patches).
        x = x.reshape(num_patches // unit, unit, C)[plan.window_index].reshape(1, num_patches, C)
        x = constrain(x, _SEQ_AXES)
        cos, sin = axial_cos_sin(plan.rotary_positions, cfg.head_dim, cfg.rope_theta)  # [N, d] float32

        block_cls = VisionBlock
        policy_name = REMAT_POLICIES[self.options.remat_policy]
        if policy_name is not None:
            block_cls = nn.remat(VisionBlock, policy=getattr(jax.checkpoint_policies, policy_name),
                                 prevent_cse=False)
        blocks = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(hidden_size=C, intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
          hidden_act=cfg.hidden_act, attention_backend=self.options.attention_backend,
          platform=self.options.platform, name="blocks", **kw)
        full_attention = jnp.asarray([i in tuple(cfg.fullatt_block_indexes) for i in range(cfg.depth)])  # [depth]
        x, _ = blocks(x, full_attention, cos, sin, plan.window_segment_ids.astype(jnp.int32),
                      plan.frame_segment_ids.astype(jnp.int32))

        merged = PatchMerger(C, cfg.out_hidden_size, unit, platform=self.options.platform, name="merger",
                             **kw)(x)[0]  # [U, out], window order
        return merged[plan.inverse_window_index]  # processor order
