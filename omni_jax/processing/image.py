"""Image patches of Qwen2.5-Omni (Qwen2VLImageProcessorPil with the released settings), numpy + Pillow.

Per image: convert to RGB (transparency composited onto white), `smart_resize` to multiples of 28 within
[min_pixels, max_pixels], Pillow bicubic resize on uint8, rescale by 1/255 (float64, then float32), normalise
with the OpenAI-CLIP mean/std (float32), repeat the frame ``temporal_patch_size`` = 2 times and cut it into
14x14 patches in merge-block-major order:

    for block row bh < gh/2, block col bw < gw/2, inner row ih < 2, inner col iw < 2:
        patch (h = 2 bh + ih, w = 2 bw + iw), flattened as (channel 3, t 2, py 14, px 14) = 1176 values

Result: ``pixel_values`` float32 [gh*gw, 1176] and ``image_grid_thw`` (1, gh, gw); the LM sees gh*gw/4 tokens.

The same patch order (t-grid major, then merge blocks) serves videos (`omni_jax.processing.video`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageProcessor",
    "ImageProcessorConfig",
    "normalize",
    "patchify",
    "preprocess_image",
    "resize_rgb",
    "smart_resize",
    "to_rgb_array",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Qwen2VLImageProcessor settings; the defaults are the released Qwen2.5-Omni preprocessor_config.json.

    ``min_side``: images with a side shorter than this many pixels are rejected (HF would upscale even a 1-pixel
    row to 56 pixels); the default is one patch (14). 0 accepts anything HF accepts."""

    min_pixels: int = 56 * 56  # 3136
    max_pixels: int = 16384 * 28 * 28  # 12,845,056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    min_side: int = 14

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ImageProcessorConfig":
        """From a preprocessor_config.json dict: ``min_pixels``/``max_pixels`` or ``size.shortest_edge``/
        ``size.longest_edge``, patch/merge sizes, mean/std (unknown keys ignored)."""
        kw: dict[str, Any] = {}
        size = cfg.get("size") or {}
        if "shortest_edge" in size:
            kw["min_pixels"] = int(size["shortest_edge"])
        if "longest_edge" in size:
            kw["max_pixels"] = int(size["longest_edge"])
        for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if cfg.get(k) is not None:
                kw[k] = int(cfg[k])
        for k in ("image_mean", "image_std"):
            if cfg.get(k) is not None:
                kw[k] = tuple(float(v) for v in cfg[k])
        return cls(**kw)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect ratio kept
    as well as possible (the HF transformers rule, Python's round-half-even included)."""
    if min(height, width) <= 0:
        raise ValueError(f"image has no pixels ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is more than "
                         f"{MAX_ASPECT_RATIO} ({width}x{height} pixels)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb_array(image: Any) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a PIL image (any mode) or a uint8 array [H, W], [H, W, 1|3|4].

    Transparency (an alpha band or a palette/`transparency` entry) is composited onto white, as HF does."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        else:
            raise ValueError(f"image arrays must be uint8 (0-255) [H, W, 3], got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {arr.shape}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:  # HF's numpy rule: alpha blend onto white, rounded
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow bicubic resize of uint8 [H, W, 3] (Pillow returns a copy when the size does not change)."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.BICUBIC))


def normalize(rgb: np.ndarray, mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]: ``(x/255 - mean)/std`` exactly as HF's PIL backend
    (x * (1/255) in float64, cast to float32, then float32 subtract and divide)."""
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.moveaxis(x, -1, -3)


def patchify(frames: np.ndarray, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Cut float32 frames [T, C, H, W] into flattened patches [t*h*w, C*tp*p*p] (t-grid major, then
    merge-block-major spatial order). T must be a multiple of ``temporal_patch_size``; H and W multiples of
    ``patch_size * merge_size``. Returns (patches, (grid_t, grid_h, grid_w))."""
    t, c, h, w = frames.shape
    if t % temporal_patch_size or h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"frames of shape {frames.shape} cannot be patchified")
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # (gt, bh, bw, ih, iw, c, tp, py, px)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), \
        (gt, gh, gw)


def preprocess_image(image: Any, config: ImageProcessorConfig = ImageProcessorConfig(),
                     ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image (PIL image or uint8 array) -> (pixel patches float32 [gh*gw, 1176], (1, gh, gw)).

    Raises ValueError for a side shorter than ``config.min_side`` or an aspect ratio above 200."""
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    if min(height, width) < max(1, config.min_side):
        raise ValueError(f"image is {width}x{height} pixels; both sides must be at least {max(1, config.min_side)} "
                         f"pixels (one {config.patch_size}x{config.patch_size} vision patch)")
    rh, rw = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    rgb = resize_rgb(rgb, rh, rw)
    chw = normalize(rgb, config.image_mean, config.image_std)  # [3, rh, rw]
    frames = np.broadcast_to(chw[None], (config.temporal_patch_size, *chw.shape))
    return patchify(frames, config.patch_size, config.merge_size, config.temporal_patch_size)


class ImageProcessor:
    """``ImageProcessor()(images) -> {"pixel_values": [N, 1176], "image_grid_thw": [n, 3] int64}``."""

    def __init__(self, config: ImageProcessorConfig = ImageProcessorConfig()):
        self.config = config

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        patches, grids = [], []
        for image in images:
            p, g = preprocess_image(image, self.config)
            patches.append(p)
            grids.append(g)
        return {"pixel_values": np.concatenate(patches, axis=0), "image_grid_thw": np.asarray(grids, np.int64)}

    def num_tokens(self, height: int, width: int) -> int:
        rh, rw = smart_resize(height, width, self.config.factor, self.config.min_pixels, self.config.max_pixels)
        return (rh // self.config.patch_size) * (rw // self.config.patch_size) // self.config.merge_size ** 2
