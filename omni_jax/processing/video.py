"""Video frame sampling and patches of Qwen2.5-Omni, numpy + Pillow.

The released pipeline is qwen-omni-utils (frame sampling, per-frame pixel budget, resize) followed by the
transformers Qwen2VLVideoProcessor (rescale + normalise, patchify). Here, for a decoded video of ``total``
frames at ``video_fps``:

* **frame count** (qwen-omni-utils ``smart_nframes``): n = total / video_fps * 2, clamped to
  [4, min(768, total) floored to even], then floored to even; it must end up in [2, total];
* **frame indices**: ``round(linspace(0, total - 1, n))`` computed as torch does it (float32, round half to even);
* **per-frame pixel budget** (qwen-omni-utils ``fetch_video``): min 128*28^2 = 100,352 and
  max = max(min(768*28^2, VIDEO_TOTAL_PIXELS / n * 2), int(1.05 * min)), VIDEO_TOTAL_PIXELS =
  int(128000 * 28^2 * 0.9) = 90,316,800; then `smart_resize` to multiples of 28;
* **resize**: Pillow bicubic on uint8 (qwen-omni-utils uses torchvision's antialiased bicubic on uint8, which
  torchvision cannot provide here; the two agree to within 1-2 levels on under 1 % of pixels);
* **normalise** as Qwen2VLVideoProcessor does (fused): float32 ``(x - 255*mean) / (255*std)``;
* **patchify**: if T is odd the last frame is repeated; t-grid major, then merge blocks (`image.patchify`);
* ``video_second_per_grid`` = temporal_patch_size / fps, with fps the nominal sampling rate (2.0, which is also
  what HF hard-codes when no fps is passed, as the released qwen-omni-utils + processor usage does).

Frame arrays [T, H, W, 3] and folders of frames are taken as already sampled (at ``fps``, default 2).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, patchify, resize_rgb, smart_resize

__all__ = [
    "VideoProcessor",
    "VideoProcessorConfig",
    "frame_indices",
    "frame_max_pixels",
    "normalize_video",
    "preprocess_video",
    "smart_nframes",
]


@dataclasses.dataclass(frozen=True)
class VideoProcessorConfig:
    """Frame sampling and resize settings of qwen-omni-utils, patch settings of Qwen2VLVideoProcessor."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28  # 100,352
    max_pixels: int = 768 * 28 * 28  # 602,112
    total_pixels: int = int(128000 * 28 * 28 * 0.9)  # 90,316,800
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
    def from_dict(cls, cfg: Mapping[str, Any]) -> "VideoProcessorConfig":
        """From a video_preprocessor_config.json dict (``size.shortest_edge``/``longest_edge`` or
        ``min_pixels``/``max_pixels``, frame limits, patch sizes, mean/std; unknown keys ignored)."""
        kw: dict[str, Any] = {}
        size = cfg.get("size") or {}
        if "shortest_edge" in size:
            kw["min_pixels"] = int(size["shortest_edge"])
        if "longest_edge" in size:
            kw["max_pixels"] = int(size["longest_edge"])
        for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "min_frames",
                  "max_frames", "total_pixels"):
            if cfg.get(k) is not None:
                kw[k] = int(cfg[k])
        if cfg.get("fps") is not None:
            kw["fps"] = float(cfg["fps"])
        for k in ("image_mean", "image_std"):
            if cfg.get(k) is not None:
                kw[k] = tuple(float(v) for v in cfg[k])
        return cls(**kw)


def smart_nframes(total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4,
                  max_frames: int = 768, frame_factor: int = 2) -> int:
    """Number of frames to sample (qwen-omni-utils rule). Raises ValueError if fewer than 2 result."""
    lo = math.ceil(min_frames / frame_factor) * frame_factor
    hi = math.floor(min(max_frames, total_frames) / frame_factor) * frame_factor
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = math.floor(n / frame_factor) * frame_factor
    if not frame_factor <= n <= total_frames:
        raise ValueError(f"cannot sample {frame_factor}..{total_frames} frames at {fps} fps from a video of "
                         f"{total_frames} frames at {video_fps:.3f} fps (a video needs at least {frame_factor} frames)")
    return n


def frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """``torch.linspace(0, total - 1, n).round().long()``, reproduced in numpy float32 (torch fills the first
    half as start + i*step and the second half as end - (n-1-i)*step; rounding is half to even)."""
    if num_frames == 1:
        return np.zeros(1, np.int64)
    start, end = np.float32(0.0), np.float32(total_frames - 1)
    step = np.float32((end - start) / np.float32(num_frames - 1))
    i = np.arange(num_frames)
    halfway = num_frames // 2
    values = np.where(i < halfway, start + step * i.astype(np.float32),
                      end - step * (num_frames - 1 - i).astype(np.float32)).astype(np.float32)
    return np.round(values).astype(np.int64)


def frame_max_pixels(num_frames: int, config: VideoProcessorConfig = VideoProcessorConfig()) -> float:
    """Per-frame pixel cap: max(min(max_pixels, total_pixels / n * 2), int(1.05 * min_pixels))."""
    return max(min(config.max_pixels, config.total_pixels / num_frames * config.temporal_patch_size),
               int(config.min_pixels * 1.05))


def normalize_video(frames: np.ndarray, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                    std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] with the fused rescale+normalise of HF's torch backend:
    ``(x - mean*255) / (std*255)`` in float32, mean*255 and std*255 rounded to float32."""
    m = (np.asarray(mean, np.float32) * np.float32(255.0)).astype(np.float32)
    s = (np.asarray(std, np.float32) * np.float32(255.0)).astype(np.float32)
    x = (frames.astype(np.float32) - m) / s
    return np.moveaxis(x, -1, -3)


def preprocess_video(frames: np.ndarray, config: VideoProcessorConfig = VideoProcessorConfig(),
                     fps: float | None = None) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Sampled RGB frames uint8 [T, H, W, 3] -> (patches float32 [t*h*w, 1176], (t, h, w), seconds per grid).

    The per-frame pixel budget depends on T (`frame_max_pixels`); ``fps`` is the rate of the given frames
    (default ``config.fps``)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, height, width = frames.shape[:3]
    if t == 0:
        raise ValueError("video has no frames")
    if min(height, width) < max(1, config.min_side):
        raise ValueError(f"video frames are {width}x{height} pixels; both sides must be at least "
                         f"{max(1, config.min_side)} pixels")
    rh, rw = smart_resize(height, width, config.factor, config.min_pixels, frame_max_pixels(t, config))
    if (rh, rw) != (height, width):
        frames = np.stack([resize_rgb(f, rh, rw) for f in frames])
    x = normalize_video(frames, config.image_mean, config.image_std)  # [T, 3, rh, rw]
    if pad := -t % config.temporal_patch_size:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    patches, grid = patchify(x, config.patch_size, config.merge_size, config.temporal_patch_size)
    fps = config.fps if fps is None else float(fps)
    return patches, grid, config.temporal_patch_size / fps


class VideoProcessor:
    """``VideoProcessor()(videos) -> {"pixel_values_videos", "video_grid_thw", "video_second_per_grid"}`` for
    already-sampled uint8 frame arrays [T, H, W, 3]."""

    def __init__(self, config: VideoProcessorConfig = VideoProcessorConfig()):
        self.config = config

    def __call__(self, videos: Sequence[np.ndarray], fps: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        patches, grids, seconds = [], [], []
        for i, frames in enumerate(videos):
            p, g, s = preprocess_video(frames, self.config, None if fps is None else fps[i])
            patches.append(p)
            grids.append(g)
            seconds.append(s)
        return {"pixel_values_videos": np.concatenate(patches, axis=0),
                "video_grid_thw": np.asarray(grids, np.int64),
                "video_second_per_grid": np.asarray(seconds, np.float32)}
