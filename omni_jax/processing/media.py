"""Loading media files: audio (soundfile, else PyAV), images (Pillow), videos (PyAV; frames and audio track).

Every failure is a `MediaError` (a ValueError) that names the input and says what is wrong.

Audio is returned as float32 mono at 16 kHz, computed the way qwen-omni-utils' ``librosa.load(path,
sr=16000)`` does it: decode to float32, average the channels, resample with soxr "HQ" (librosa's default
``res_type="soxr_hq"``), then pad/trim to ceil(n * 16000 / sr) samples (librosa's ``fix_length``). Files that
libsndfile cannot read (m4a, the audio track of a video, ...) are decoded with PyAV, which librosa would hand
to audioread/ffmpeg instead (audioread decodes to 16-bit PCM, so those can differ by ~1/32768).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from omni_jax.processing.video import VideoProcessorConfig, frame_indices, smart_nframes

__all__ = [
    "IMAGE_EXTENSIONS",
    "MediaError",
    "Video",
    "describe_source",
    "load_audio",
    "load_image",
    "load_video",
    "read_video_frames",
    "resample_audio",
]

SAMPLING_RATE = 16000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class MediaError(ValueError):
    """A media input that cannot be used (missing, unreadable, empty, too small, ...)."""


def describe_source(source: Any) -> str:
    """Short human-readable name of a media input, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, np.ndarray):
        return f"array {source.dtype} {tuple(source.shape)}"
    name = type(source).__name__
    size = getattr(source, "size", None)
    if type(source).__module__.startswith("PIL") and size is not None:
        return f"PIL image {source.mode} {size[0]}x{size[1]}"
    return name


def _strip_file_url(source: str | os.PathLike) -> str:
    path = os.fspath(source)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if path.startswith(("http://", "https://")):
        raise MediaError(f"{path!r}: URLs are not fetched (no network at run time); download the file first")
    return path


def _existing_path(source: str | os.PathLike, kind: str) -> str:
    path = _strip_file_url(source)
    if not os.path.exists(path):
        raise MediaError(f"{kind} file not found: {path!r}")
    return path


# ----------------------------------------------------------------------------------------------- audio
def resample_audio(waveform: np.ndarray, orig_sr: float, target_sr: int = SAMPLING_RATE) -> np.ndarray:
    """librosa.resample(res_type="soxr_hq") equivalent: soxr HQ, then pad/trim to ceil(n * target / orig)."""
    if orig_sr == target_sr:
        return waveform
    import soxr

    n_out = int(np.ceil(waveform.shape[-1] * float(target_sr) / orig_sr))
    out = soxr.resample(waveform, orig_sr, target_sr, quality="soxr_hq")
    if out.shape[-1] > n_out:
        out = out[:n_out]
    elif out.shape[-1] < n_out:
        out = np.pad(out, (0, n_out - out.shape[-1]))
    return np.asarray(out, dtype=waveform.dtype)


def _mono_float32(data: np.ndarray) -> np.ndarray:
    """[C, n] or [n] float32 -> [n] (channel mean, as librosa.to_mono)."""
    if data.ndim > 1:
        data = np.mean(data, axis=tuple(range(data.ndim - 1)))
    return np.ascontiguousarray(data, dtype=np.float32)


def _decode_audio_pyav(path: str, container=None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV -> (float32 [C, n], sample rate)."""
    import av

    own = container is None
    if own:
        container = av.open(path)
    try:
        if not container.streams.audio:
            raise MediaError(f"{path!r} has no audio stream")
        stream = container.streams.audio[0]
        chunks, rate = [], None
        resampler = None
        for frame in container.decode(stream):
            if resampler is None:
                rate = frame.sample_rate
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        if resampler is not None:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        if not chunks:
            return np.zeros((1, 0), np.float32), rate or SAMPLING_RATE
        return np.concatenate(chunks, axis=1).astype(np.float32), int(rate)
    finally:
        if own:
            container.close()


def load_audio(source: Any, sampling_rate: int = SAMPLING_RATE, source_rate: int | None = None) -> np.ndarray:
    """Mono float32 waveform at ``sampling_rate`` from a path (wav/flac/ogg/mp3 via soundfile, anything else
    ffmpeg reads via PyAV) or an array.

    Arrays are taken as mono audio at ``source_rate`` (default: already at ``sampling_rate``); 2-D arrays are
    [channels, samples] (or [samples, channels] when the first axis is the longer one) and are averaged.
    Raises MediaError for a missing/unreadable file, an empty or non-finite waveform."""
    name = describe_source(source)
    if isinstance(source, (str, os.PathLike)):
        path = _existing_path(source, "audio")
        data, rate = None, None
        try:
            import soundfile as sf

            with sf.SoundFile(path) as f:
                rate = f.samplerate
                data = f.read(dtype="float32", always_2d=False).T  # [C, n] or [n]
        except Exception as sf_err:  # not something libsndfile reads: try ffmpeg
            try:
                data, rate = _decode_audio_pyav(path)
            except MediaError:
                raise
            except Exception as av_err:
                raise MediaError(f"cannot read audio file {path!r}: {sf_err}; ffmpeg: {av_err}") from av_err
        waveform = _mono_float32(np.asarray(data))
    else:
        arr = np.asarray(source)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise MediaError(f"audio {name}: expected a path or a numeric waveform array")
        if np.issubdtype(arr.dtype, np.integer):
            if arr.dtype != np.int16:
                raise MediaError(f"audio {name}: integer waveforms must be int16 (or pass float in [-1, 1])")
            arr = arr.astype(np.float32) / 32768.0
        if arr.ndim == 2:
            arr = arr if arr.shape[0] <= arr.shape[1] else arr.T
        elif arr.ndim != 1:
            raise MediaError(f"audio {name}: expected a 1-D waveform (or [channels, samples]), got {arr.ndim}-D")
        waveform = _mono_float32(arr.astype(np.float32, copy=False))
        rate = source_rate or sampling_rate
    if waveform.shape[0] == 0:
        raise MediaError(f"audio {name} is empty (zero samples)")
    if not np.all(np.isfinite(waveform)):
        raise MediaError(f"audio {name} contains NaN or infinite samples")
    return resample_audio(waveform, rate, sampling_rate)


# ----------------------------------------------------------------------------------------------- images
def load_image(source: Any):
    """A fully decoded PIL image from a path, a PIL image or an array (arrays are returned unchanged).

    EXIF orientation is applied to files (as HF ``load_image`` does). Raises MediaError for a missing,
    unreadable or truncated file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image) or isinstance(source, np.ndarray):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(f"image {describe_source(source)}: expected a path, a PIL image or a uint8 array")
    path = _existing_path(source, "image")
    try:
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im)
            if image is im:
                image = im.copy()
    except UnidentifiedImageError as err:
        raise MediaError(f"cannot read image file {path!r}: not an image format Pillow recognises") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"cannot read image file {path!r} (truncated or corrupt?): {err}") from err
    return image


# ----------------------------------------------------------------------------------------------- videos
@dataclasses.dataclass
class Video:
    """Sampled frames and (optionally) the audio track of a video."""

    frames: np.ndarray  # [T, H, W, 3] uint8, already sampled
    fps: float  # nominal rate of `frames` (the requested sampling rate, e.g. 2.0)
    sample_fps: float  # actual rate: T / total_frames * video_fps (qwen-omni-utils' "sample_fps")
    total_frames: int | None = None  # frames in the file (None for arrays / folders)
    video_fps: float | None = None  # frame rate of the file
    audio: np.ndarray | None = None  # float32 mono 16 kHz


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _frames_from_folder(path: str) -> np.ndarray:
    from omni_jax.processing.image import to_rgb_array

    files = sorted((f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
    if not files:
        raise MediaError(f"video folder {path!r} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
    frames = [to_rgb_array(load_image(os.path.join(path, f))) for f in files]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise MediaError(f"video folder {path!r}: frames differ in size ({sorted(shapes)})")
    return np.stack(frames)


def read_video_frames(path: str, fps: float, min_frames: int, max_frames: int,
                      ) -> tuple[np.ndarray, int, float]:
    """Decode a video file with PyAV and sample it (qwen-omni-utils rule, see `omni_jax.processing.video`).

    Returns (frames uint8 [n, H, W, 3], total_frames, video_fps). The frame count comes from the container
    header when it has one (checked while decoding), else from a first decoding pass."""
    import av

    def open_video():
        try:
            container = av.open(path)
        except Exception as err:
            raise MediaError(f"cannot open video file {path!r} (truncated or not a video?): {err}") from err
        if not container.streams.video:
            container.close()
            raise MediaError(f"{path!r} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return container, stream

    def decode(wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
        container, stream = open_video()
        kept: dict[int, np.ndarray] = {}
        count = 0
        try:
            for count, frame in enumerate(container.decode(stream), start=1):
                if wanted is not None and count - 1 in wanted:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
        except Exception as err:
            raise MediaError(f"cannot decode video file {path!r} (truncated or corrupt?): {err}") from err
        finally:
            container.close()
        return kept, count

    def indices(total: int) -> np.ndarray:
        try:
            return frame_indices(total, smart_nframes(total, video_fps, fps, min_frames, max_frames))
        except ValueError as err:
            raise MediaError(f"video file {path!r}: {err}") from err

    container, stream = open_video()
    try:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        hint = int(stream.frames or 0)
    finally:
        container.close()
    if not rate:
        raise MediaError(f"video file {path!r}: frame rate unknown")
    video_fps = float(rate)

    if hint >= 2:
        idx = indices(hint)
        kept, count = decode(set(idx.tolist()))
        if count == hint:
            return np.stack([kept[int(i)] for i in idx]), count, video_fps
    _, count = decode(None)  # no (or a wrong) frame count in the header: count by decoding
    if count == 0:
        raise MediaError(f"video file {path!r} has no decodable frames")
    idx = indices(count)
    kept, count2 = decode(set(idx.tolist()))
    if count2 != count:
        raise MediaError(f"video file {path!r}: decoding gave {count} then {count2} frames")
    return np.stack([kept[int(i)] for i in idx]), count, video_fps


def _video_audio(path: str, sampling_rate: int) -> np.ndarray:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise MediaError(f"video file {path!r} has no audio track (use_audio_in_video needs one)")
            data, rate = _decode_audio_pyav(path, container)
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"cannot decode the audio track of {path!r}: {err}") from err
    waveform = _mono_float32(data)
    if waveform.shape[0] == 0:
        raise MediaError(f"the audio track of video file {path!r} is empty")
    return resample_audio(waveform, rate, sampling_rate)


def load_video(source: Any, config: VideoProcessorConfig = VideoProcessorConfig(), fps: float | None = None,
               load_audio_track: bool = False, audio: Any = None,
               sampling_rate: int = SAMPLING_RATE) -> Video:
    """Load and sample a video.

    ``source``: a video file (mp4, webm, mkv, ... anything ffmpeg decodes), a folder of frame images (sorted
    by name, natural order), a uint8 array [T, H, W, 3] or a list of images (PIL / arrays / paths). Files are
    sampled at ``fps`` (default ``config.fps`` = 2) with an even count in [min_frames, max_frames]; folders,
    arrays and lists are taken as already sampled at ``fps``.
    ``load_audio_track``: also return the audio track (files), or ``audio`` (a path or 16 kHz waveform) for
    frame inputs, as float32 mono 16 kHz."""
    fps = float(config.fps if fps is None else fps)
    if fps <= 0:
        raise MediaError(f"video {describe_source(source)}: fps must be positive, got {fps}")
    name = describe_source(source)
    total = video_fps = None
    track = None
    if isinstance(source, (str, os.PathLike)):
        path = _existing_path(source, "video")
        if os.path.isdir(path):
            frames = _frames_from_folder(path)
            sample_fps = fps
        else:
            frames, total, video_fps = read_video_frames(path, fps, config.min_frames, config.max_frames)
            sample_fps = frames.shape[0] / max(total, 1e-6) * video_fps
            if load_audio_track and audio is None:
                track = _video_audio(path, sampling_rate)
    else:
        if isinstance(source, np.ndarray):
            frames = source
        elif isinstance(source, Iterable):
            from omni_jax.processing.image import to_rgb_array

            try:
                frames = np.stack([to_rgb_array(load_image(f)) for f in source])
            except ValueError as err:
                raise MediaError(f"video {name}: {err}") from err
        else:
            raise MediaError(f"video {name}: expected a path, a folder, a uint8 array [T, H, W, 3] or a list of frames")
        sample_fps = fps
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise MediaError(f"video {name}: frame arrays must be uint8 [T, H, W, 3]")
    if frames.shape[0] == 0:
        raise MediaError(f"video {name} has no frames")
    if frames.shape[0] > config.max_frames and total is None:
        raise MediaError(f"video {name} has {frames.shape[0]} frames; at most {config.max_frames} are allowed "
                         "(sample it first)")
    if load_audio_track and track is None:
        if audio is None:
            raise MediaError(f"video {name}: use_audio_in_video needs an audio track; frame inputs need one given "
                             "separately (the part's 'audio_track': a path or a 16 kHz waveform)")
        track = load_audio(audio, sampling_rate)
    return Video(frames=frames, fps=fps, sample_fps=float(sample_fps), total_frames=total,
                 video_fps=video_fps, audio=track)
