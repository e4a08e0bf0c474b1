"""Log-mel audio features of Qwen2.5-Omni (WhisperFeatureExtractor with the released settings), numpy only.

The released processor (`preprocessor_config.json`: feature_size 128, sampling_rate 16000, hop_length 160,
n_fft 400, chunk_length 300) computes, for every clip:

1. zero-pad (or truncate) the 16 kHz mono waveform to ``n_samples = 300 s * 16000 = 4,800,000`` samples;
2. STFT: periodic Hann window of 400, hop 160, centred frames with 200 samples of *reflect* padding at both
   ends of the padded buffer; power spectrum |X|^2; the last frame is dropped (30000 frames remain);
3. Slaney mel filterbank (128 filters, 0-8000 Hz, Slaney area normalisation) over the 201 bins;
4. log10(max(mel, 1e-10)); dynamic range x = max(x, max_x - 8) where max_x is taken over the whole padded
   example (all mels and frames); then (x + 4) / 4;
5. ``feature_attention_mask[f] = 1`` for the frames f < ceil(n_valid / 160).

`extract_features(..., pad_to_max=True)` reproduces that exactly ([B, 128, 30000]). The default computes only
the frames up to the batch's longest clip, rounded up to ``pad_to_multiple_of`` frames (200 = one 2-s window of
the audio encoder). The model reads only the valid frames, and those are bit-identical in both modes:

* each clip's spectrogram is computed on a buffer that extends at least 201 zero samples past its last valid
  sample, so no valid frame (window [160 f - 200, 160 f + 200)) and no frame that touches a valid sample sees
  the end-of-buffer reflect padding -- except when that buffer would reach 300 s, where it *is* HF's buffer
  (same length, same reflect padding);
* frames whose window holds only padding zeros have mel = 0 exactly, i.e. log10 = -10, the smallest value any
  frame can take. So the maximum over the padded example equals the maximum over the frames that touch valid
  samples (padding frames next to the clip end *can* exceed the valid frames' maximum, since their windows
  still cover the last up-to-200 samples; they are included), and all remaining frames equal
  ``(max(-10, max_x - 8) + 4) / 4``, which is how they are filled.

Numerics: numpy FFT in float64 (HF's torch path uses float32 `torch.stft`); see tests/test_processing.py for
the measured difference to HF (about 1e-6, well within 1e-5).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "AudioFeatureConfig",
    "AudioFeatureExtractor",
    "audio_token_count",
    "extract_features",
    "hann_window",
    "log_mel_spectrogram",
    "num_feature_frames",
    "slaney_mel_filter_bank",
]

LOG_FLOOR = -10.0  # log10 of the 1e-10 clamp
DYNAMIC_RANGE = 8.0  # in log10 units (80 dB)
DEFAULT_FRAME_BUCKET = 200  # frames; one 2-s attention window of the audio encoder


@dataclasses.dataclass(frozen=True)
class AudioFeatureConfig:
    """WhisperFeatureExtractor settings. Defaults are the released Qwen2.5-Omni ones."""

    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 300  # seconds; every clip is padded / truncated to this in HF
    padding_value: float = 0.0
    dither: float = 0.0

    def __post_init__(self):
        if self.padding_value != 0.0:
            raise ValueError(f"only padding_value 0.0 is supported, got {self.padding_value}")
        if self.dither != 0.0:
            raise ValueError(f"only dither 0.0 is supported (the released value), got {self.dither}")

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        return self.n_samples // self.hop_length

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "AudioFeatureConfig":
        """From a preprocessor_config.json dict (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: cfg[k] for k in names if k in cfg})


# ----------------------------------------------------------------------------------------------- filterbank
def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    linear = 3.0 * freq / 200.0  # 200/3 Hz per mel below 1 kHz
    logstep = 27.0 / np.log(6.4)
    with np.errstate(divide="ignore"):
        logpart = 15.0 + np.log(np.maximum(freq, 1e-30) / 1000.0) * logstep
    return np.where(freq >= 1000.0, logpart, linear)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    logstep = np.log(6.4) / 27.0
    logpart = 1000.0 * np.exp(logstep * (mel - 15.0))
    return np.where(mel >= 15.0, logpart, linear)


def slaney_mel_filter_bank(num_frequency_bins: int = 201, num_mel_filters: int = 128,
                           sampling_rate: int = 16000, min_frequency: float = 0.0,
                           max_frequency: float = 8000.0) -> np.ndarray:
    """Triangular mel filters on the Slaney mel scale with Slaney area normalisation.

    Same construction as librosa ``filters.mel(htk=False, norm="slaney")`` and HF ``mel_filter_bank(
    norm="slaney", mel_scale="slaney")``. Returns float64 ``[num_frequency_bins, num_mel_filters]``.
    """
    mel_edges = np.linspace(_hz_to_mel_slaney(min_frequency), _hz_to_mel_slaney(max_frequency),
                            num_mel_filters + 2)
    hz_edges = _mel_to_hz_slaney(mel_edges)  # [M + 2]
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)  # [F]
    widths = np.diff(hz_edges)  # [M + 1]
    offsets = hz_edges[None, :] - fft_freqs[:, None]  # [F, M + 2]
    rising = -offsets[:, :-2] / widths[:-1]  # [F, M]
    falling = offsets[:, 2:] / widths[1:]  # [F, M]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (hz_edges[2:] - hz_edges[:-2])[None, :]
    return filters


def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window default), float64."""
    n = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)


# ----------------------------------------------------------------------------------------------- features
def num_feature_frames(num_samples: int, config: AudioFeatureConfig = AudioFeatureConfig()) -> int:
    """Valid mel frames of a clip of ``num_samples`` samples: ceil(n / hop), at most the 300-s maximum."""
    return min(-(-int(num_samples) // config.hop_length), config.nb_max_frames)


def audio_token_count(num_frames: int | np.ndarray) -> int | np.ndarray:
    """LM audio tokens for F valid mel frames (conv stride 2, then 2x pooling): 100 frames/s -> 25 tokens/s."""
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class _Spectrogram:
    """Cached window and filterbank for one config."""

    def __init__(self, config: AudioFeatureConfig):
        self.config = config
        self.window = hann_window(config.n_fft)
        # HF's torch path multiplies by the float32 filterbank; use the float32-rounded values too.
        self.mel_filters = slaney_mel_filter_bank(1 + config.n_fft // 2, config.feature_size,
                                                  config.sampling_rate).astype(np.float32).astype(np.float64)

    def log_mel(self, buffer: np.ndarray, num_frames: int) -> np.ndarray:
        """log10 mel of the first ``num_frames`` centred frames of ``buffer`` (reflect padded at both ends).

        Returns float64 [n_mels, num_frames] (before the dynamic-range clamp)."""
        n_fft, hop = self.config.n_fft, self.config.hop_length
        half = n_fft // 2
        padded = np.pad(buffer.astype(np.float64), (half, half), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:num_frames]  # [T, n_fft]
        spec = np.fft.rfft(frames * self.window, axis=-1)  # [T, n_fft/2 + 1]
        power = spec.real ** 2 + spec.imag ** 2
        mel = power @ self.mel_filters  # [T, n_mels]
        return np.log10(np.maximum(mel, 1e-10)).T


_SPECTROGRAMS: dict[AudioFeatureConfig, _Spectrogram] = {}


def _spectrogram(config: AudioFeatureConfig) -> _Spectrogram:
    if config not in _SPECTROGRAMS:
        _SPECTROGRAMS[config] = _Spectrogram(config)
    return _SPECTROGRAMS[config]


def log_mel_spectrogram(waveform: np.ndarray, num_frames: int,
                        config: AudioFeatureConfig = AudioFeatureConfig()) -> np.ndarray:
    """Normalised log-mel features of one clip as HF computes them on its 300-s padded buffer, float32
    [n_mels, num_frames]; ``num_frames`` may be anything from 0 to ``config.nb_max_frames``."""
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)[: config.n_samples]
    n = waveform.shape[0]
    hop, half = config.hop_length, config.n_fft // 2
    # Frames that can see a valid sample: f < (n + half) / hop. Buffer reaching >= half + 1 zeros past the end.
    frames_touching = min(-(-(n + half) // hop), config.nb_max_frames)
    compute_frames = min(max(frames_touching, -(-(n + half + 1) // hop)), config.nb_max_frames)
    buffer_len = min(compute_frames * hop, config.n_samples)
    if compute_frames == config.nb_max_frames:
        buffer_len = config.n_samples  # exactly HF's buffer (end reflect padding included)
    buffer = np.zeros(buffer_len, dtype=np.float32)
    buffer[:n] = waveform
    log_spec = _spectrogram(config).log_mel(buffer, compute_frames)  # [M, compute_frames]
    max_x = float(log_spec.max()) if log_spec.size else LOG_FLOOR
    if compute_frames < config.nb_max_frames:
        max_x = max(max_x, LOG_FLOOR)  # all-zero frames of the padded example (value -10)
    floor = max_x - DYNAMIC_RANGE
    out = np.empty((config.feature_size, num_frames), dtype=np.float32)
    keep = min(num_frames, compute_frames)
    out[:, :keep] = ((np.maximum(log_spec[:, :keep], floor) + 4.0) / 4.0).astype(np.float32)
    out[:, keep:] = np.float32((max(LOG_FLOOR, floor) + 4.0) / 4.0)
    return out


def extract_features(waveforms: Sequence[np.ndarray], config: AudioFeatureConfig = AudioFeatureConfig(),
                     pad_to_max: bool = False, pad_to_multiple_of: int = DEFAULT_FRAME_BUCKET,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of a batch of 16 kHz mono waveforms.

    Args:
      waveforms: 1-D float arrays at ``config.sampling_rate``. Clips longer than ``chunk_length`` (300 s) are
        truncated, as HF does (with a warning here).
      pad_to_max: pad every clip to ``nb_max_frames`` (30000) frames, exactly like HF.
      pad_to_multiple_of: otherwise, the frame axis is the longest clip's valid frames rounded up to this
        (at most nb_max_frames).
    Returns:
      ``input_features`` float32 [B, n_mels, L] and ``feature_attention_mask`` int32 [B, L].
    """
    if len(waveforms) == 0:
        raise ValueError("extract_features needs at least one waveform")
    clips = []
    for i, w in enumerate(waveforms):
        w = np.asarray(w)
        if w.ndim != 1:
            raise ValueError(f"audio {i}: expected a 1-D mono waveform, got shape {w.shape}")
        if w.shape[0] > config.n_samples:
            log.warning("audio %d: %.1f s is longer than the %d s maximum; truncated", i,
                        w.shape[0] / config.sampling_rate, config.chunk_length)
        clips.append(w[: config.n_samples])
    valid = [num_feature_frames(c.shape[0], config) for c in clips]
    if pad_to_max:
        length = config.nb_max_frames
    else:
        m = max(1, int(pad_to_multiple_of))
        length = min(-(-max(valid) // m) * m, config.nb_max_frames)
    features = np.stack([log_mel_spectrogram(c, length, config) for c in clips])
    mask = (np.arange(length)[None, :] < np.asarray(valid)[:, None]).astype(np.int32)
    return features, mask


class AudioFeatureExtractor:
    """Callable wrapper: ``fe(waveforms) -> {"input_features", "feature_attention_mask"}``."""

    def __init__(self, config: AudioFeatureConfig = AudioFeatureConfig(), pad_to_max: bool = False,
                 pad_to_multiple_of: int = DEFAULT_FRAME_BUCKET):
        self.config = config
        self.pad_to_max = pad_to_max
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, waveforms: Sequence[np.ndarray], pad_to_max: bool | None = None) -> dict[str, np.ndarray]:
        features, mask = extract_features(
            waveforms, self.config, pad_to_max=self.pad_to_max if pad_to_max is None else pad_to_max,
            pad_to_multiple_of=self.pad_to_multiple_of)
        return {"input_features": features, "feature_attention_mask": mask}

    def num_tokens(self, num_samples: int) -> int:
        return int(audio_token_count(num_feature_frames(num_samples, self.config)))
