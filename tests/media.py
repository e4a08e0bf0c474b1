"""Helpers that write real test media files: wav (any rate / channels), png/jpg (any size and mode), videos
with PyAV (mp4 H.264 + AAC, webm VP9 + Opus, mkv MPEG-4 + PCM), folders of frames, truncated/corrupt copies.

Content is deterministic: audio is a chirp plus a tone plus a little noise; frames are colour gradients that
move with the frame index (so differently sampled frames differ)."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np


def test_signal(seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """float32 [n] (mono) or [n, channels]: chirp 200->2000 Hz + 440 Hz tone + noise, quiet first 10 %."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    out = []
    for c in range(channels):
        x = 0.3 * np.sin(2 * np.pi * (200 + 900 * t / max(seconds, 1e-3)) * t + c)
        x += 0.1 * np.sin(2 * np.pi * (440 + 110 * c) * t)
        x += 0.02 * rng.standard_normal(n)
        x[: n // 10] *= 0.01
        out.append(x)
    y = np.stack(out, axis=-1).astype(np.float32)
    return y[:, 0] if channels == 1 else y


def write_wav(path, seconds: float, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16",
              seed: int = 0) -> Path:
    import soundfile as sf

    path = Path(path)
    sf.write(path, test_signal(seconds, rate, channels, seed), rate, subtype=subtype)
    return path


def test_frame(width: int, height: int, index: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] smooth colour gradient shifted by ``index``, with a bright square that moves."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(x / max(width, 1) * 6.28 + index * 0.3)
    g = 127 + 120 * np.cos(y / max(height, 1) * 6.28 - index * 0.2)
    b = (x + y + 7 * index) % 256
    img = np.stack([r, g, b], axis=-1)
    s = max(2, min(width, height) // 5)
    ox = (index * 7) % max(1, width - s)
    oy = (index * 5) % max(1, height - s)
    img[oy:oy + s, ox:ox + s] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path, width: int, height: int, mode: str = "RGB", index: int = 0, **save_kwargs) -> Path:
    """Write an image file (format from the suffix) in a PIL mode: RGB, RGBA, L, LA, P (palette), P+transparency
    ("PT"), CMYK, I;16 ..."""
    from PIL import Image

    path = Path(path)
    rgb = test_frame(width, height, index)
    im = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = (np.linspace(0, 255, width)[None, :] * np.ones((height, 1))).astype(np.uint8)
        im = Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1), "RGBA")
    elif mode == "P":
        im = im.quantize(32)
    elif mode == "PT":
        im = im.quantize(32)
        im.info["transparency"] = 0
        save_kwargs.setdefault("transparency", 0)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, **save_kwargs)
    return path


def write_frame_folder(folder, n: int, width: int, height: int, ext: str = ".png") -> Path:
    """n frames named frame_1.png .. frame_n.png (natural order differs from lexicographic order for n >= 10)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_image(folder / f"frame_{i + 1}{ext}", width, height, index=i)
    return folder


_CODECS = {
    ".mp4": ("libx264", "yuv420p", "aac", "fltp"),
    ".webm": ("libvpx-vp9", "yuv420p", "libopus", "flt"),
    ".mkv": ("mpeg4", "yuv420p", "pcm_s16le", "s16"),
}


def write_video(path, seconds: float, fps: float = 10, width: int = 320, height: int = 240,
                audio_rate: int | None = 44100, audio_channels: int = 2) -> Path:
    """Write a video with PyAV: codecs by suffix (.mp4 H.264+AAC, .webm VP9+Opus, .mkv MPEG-4+PCM). With
    ``audio_rate=None`` there is no audio track. Returns the path; the frame count is round(seconds * fps)."""
    import av

    path = Path(path)
    vcodec, pix_fmt, acodec, afmt = _CODECS[path.suffix]
    n_frames = int(round(seconds * fps))
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        vs = container.add_stream(vcodec, rate=rate)
        vs.width, vs.height, vs.pix_fmt = width, height, pix_fmt
        if vcodec == "libx264":
            vs.options = {"crf": "18", "preset": "ultrafast"}
        astream = None
        if audio_rate is not None:
            if acodec == "libopus":
                audio_rate = 48000
            layout = "stereo" if audio_channels == 2 else "mono"
            astream = container.add_stream(acodec, rate=audio_rate, layout=layout)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(test_frame(width, height, i), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1) / rate
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if astream is not None:
            signal = test_signal(seconds, audio_rate, audio_channels)  # [n] or [n, C]
            signal = signal.reshape(len(signal), -1).T  # [C, n]
            block = astream.codec_context.frame_size or 1024
            for start in range(0, signal.shape[1], block):
                chunk = signal[:, start:start + block]
                if afmt == "s16":
                    data = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
                elif afmt == "flt":
                    data = np.ascontiguousarray(chunk.T.reshape(1, -1))
                else:
                    data = np.ascontiguousarray(chunk)
                aframe = av.AudioFrame.from_ndarray(data, format=afmt, layout=astream.layout.name)
                aframe.sample_rate = audio_rate
                aframe.pts = start
                aframe.time_base = Fraction(1, audio_rate)
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode(None):
                container.mux(packet)
    return path


def truncated_copy(src, dst, keep_fraction: float = 0.5) -> Path:
    """Copy only the first part of a file (a truncated download)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    return dst


def corrupt_copy(src, dst, offset: int = 64, length: int = 256, seed: int = 0) -> Path:
    """Copy a file with ``length`` bytes overwritten by noise at ``offset``."""
    data = bytearray(Path(src).read_bytes())
    noise = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    data[offset:offset + length] = noise[: max(0, min(length, len(data) - offset))]
    dst = Path(dst)
    dst.write_bytes(bytes(data))
    return dst


def write_empty_wav(path, rate: int = 16000) -> Path:
    import soundfile as sf

    path = Path(path)
    sf.write(path, np.zeros(0, np.float32), rate, subtype="PCM_16")
    return path


if __name__ == "__main__":  # write a sample set for a look by hand
    out = Path(os.environ.get("OUT", "/tmp/omni_media"))
    out.mkdir(parents=True, exist_ok=True)
    write_wav(out / "a16k.wav", 2.3)
    write_wav(out / "a44k_stereo.wav", 3.0, 44100, 2)
    write_image(out / "odd.png", 223, 97)
    write_image(out / "odd.jpg", 333, 111, quality=95)
    for ext in (".mp4", ".webm", ".mkv"):
        write_video(out / f"clip{ext}", 4.0)
    write_frame_folder(out / "frames", 12, 64, 48)
    print(sorted(os.listdir(out)))
