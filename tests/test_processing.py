"""The numpy input side (audio mel, image / video patches, media loading, Processor) against HF transformers.

Oracles:
* audio: ``WhisperFeatureExtractor`` with the released settings (its torch path, float32 ``torch.stft``), and a
  float64 ``torch.stft`` run of the same math; resampling against ``librosa.load(path, sr=16000)`` (what
  qwen-omni-utils does);
* images: ``Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)``;
* videos: the HF video processor cannot be built without torchvision (spec §14.9). The oracle is assembled from
  the HF pieces that run: ``smart_resize`` and ``Qwen2VLVideoProcessor.patchify`` from
  ``video_processing_qwen2_vl.py`` (loaded with a stub ``torchvision`` module: patchify is pure torch), HF's
  ``TorchvisionBackend.rescale_and_normalize`` (fused rescale+normalise) with torchvision's ``normalize``
  (sub_, div_) written out in torch, HF's PIL ``resize`` for the frames, and qwen-omni-utils' sampling rule
  (``torch.linspace(...).round()`` run here). The one piece not reproduced is torchvision's antialiased
  bicubic resize of qwen-omni-utils: we use Pillow's bicubic; ``test_video_resize_vs_torch_antialias``
  measures the gap against ``torch.nn.functional.interpolate(uint8, bicubic, antialias=True)``, which is what
  torchvision calls for uint8 CPU frames;
* Processor: HF ``Qwen2_5OmniProcessor`` built from the pieces above (with ``transformers.VideoProcessorMixin``
  patched in and the oracle video processor), tokenizer from `write_qwen_tokenizer`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from omni_jax.processing import (
    AudioFeatureConfig,
    ImageProcessorConfig,
    MediaError,
    Processor,
    VideoProcessorConfig,
    extract_features,
    load_audio,
    load_image,
    load_video,
    preprocess_image,
    preprocess_video,
    write_qwen_tokenizer,
)
from omni_jax.processing.audio import audio_token_count, slaney_mel_filter_bank
from omni_jax.processing.image import resize_rgb
from omni_jax.processing.processor import interleave_video_audio
from omni_jax.processing.tokenizer import (
    AUDIO_BOS_ID,
    AUDIO_EOS_ID,
    AUDIO_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_BOS_ID,
    VISION_EOS_ID,
)
from omni_jax.processing.video import frame_indices, frame_max_pixels, smart_nframes
import media as M  # tests/media.py (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:audioread.rawread")

# HF computes the STFT in float32 (torch.stft): its rounding error, ~1e-7 of a frame's energy, reaches up to
# ~5e-5 in weak mel bands of loud frames. We compute in float64 and agree with a float64 run of HF's math to
# ~6e-8 (float32 output rounding); see _float64_reference.
AUDIO_TOL = 1e-4
F64_TOL = 1e-6
SR = 16000


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    M.write_wav(d / "a44k_stereo.wav", 3.1, 44100, 2, seed=1)
    M.write_wav(d / "a8k.wav", 1.7, 8000, 1, seed=2)
    M.write_wav(d / "a22k_float.wav", 2.0, 22050, 1, subtype="FLOAT", seed=3)
    M.write_wav(d / "a16k.wav", 2.3, 16000, 1, seed=4)
    M.write_empty_wav(d / "empty.wav")
    M.write_image(d / "odd.png", 223, 97)
    M.write_image(d / "odd.jpg", 333, 111, quality=95)
    M.write_image(d / "rgba.png", 50, 61, "RGBA")
    M.write_image(d / "tiny.png", 1, 40)
    M.corrupt_copy(d / "odd.png", d / "corrupt.png", offset=40, length=400)
    M.truncated_copy(d / "odd.png", d / "truncated.png", 0.5)
    M.write_video(d / "clip.mp4", 4.0, fps=10, width=320, height=240)  # 40 frames, H.264 + AAC 44.1 kHz
    M.write_video(d / "clip.webm", 3.0, fps=12, width=176, height=144)  # VP9 + Opus
    M.write_video(d / "clip.mkv", 2.5, fps=8, width=160, height=120, audio_rate=22050)  # MPEG-4 + PCM
    M.write_video(d / "silent.mp4", 2.0, fps=10, width=128, height=96, audio_rate=None)
    M.write_video(d / "example.mp4", 4.0, fps=10, width=336, height=308)  # spec §3.5 worked example
    M.truncated_copy(d / "clip.mp4", d / "truncated.mp4", 0.4)
    M.write_frame_folder(d / "frames", 11, 100, 60)
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_qwen_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def processor(tok_dir):
    return Processor.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf_fe():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300,
                                   n_fft=400, padding_value=0.0, return_attention_mask=True)


@pytest.fixture(scope="module")
def hf_ip():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)


def _load_hf_video_module():
    """transformers' video_processing_qwen2_vl.py, imported with a stub torchvision (only names needed at import
    time; the functions used here -- smart_resize, patchify -- are pure Python / torch)."""
    import transformers

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    stubs = [types.ModuleType(n) for n in names]
    stubs[0].transforms, stubs[1].v2, stubs[2].functional = stubs[1], stubs[2], stubs[3]
    stubs[3].InterpolationMode = type("InterpolationMode", (), {})
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(dict(zip(names, stubs)))
    try:
        path = os.path.join(os.path.dirname(transformers.__file__), "models/qwen2_vl/video_processing_qwen2_vl.py")
        spec = importlib.util.spec_from_file_location("transformers.models.qwen2_vl._oracle_video_processing", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return module


class _FusedNormalize:
    """HF TorchvisionBackend's fused rescale+normalise; ``normalize`` is torchvision's (sub_, then div_)."""

    def __init__(self):
        from transformers.image_processing_backends import TorchvisionBackend

        self._fuse = TorchvisionBackend._fuse_mean_std_and_rescale_factor
        self._run = TorchvisionBackend.rescale_and_normalize

    def _fuse_mean_std_and_rescale_factor(self, *args, **kwargs):
        return self._fuse(self, *args, **kwargs)

    def normalize(self, image, mean, std, inplace=False):
        import torch

        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)

    def __call__(self, videos):
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        return self._run(self, videos, True, 1 / 255, True, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))


@pytest.fixture(scope="module")
def hf_video_oracle():
    """Callable: sampled uint8 frames [T, H, W, 3] -> (pixel_values_videos, grid) from HF pieces."""
    import torch
    from transformers.image_transforms import resize as hf_resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    vp = _load_hf_video_module()
    fused = _FusedNormalize()

    def run(frames: np.ndarray):
        t, h, w = frames.shape[:3]
        # qwen-omni-utils fetch_video: per-frame budget from the sampled frame count
        max_pixels = max(min(768 * 28 * 28, int(128000 * 28 * 28 * 0.9) / t * 2), int(128 * 28 * 28 * 1.05))
        rh, rw = vp.smart_resize(h, w, factor=28, min_pixels=128 * 28 * 28, max_pixels=max_pixels)
        if (rh, rw) != (h, w):
            frames = np.stack([hf_resize(f, (rh, rw), resample=PILImageResampling.BICUBIC,
                                         input_data_format=ChannelDimension.LAST) for f in frames])
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None]  # [1, T, C, H, W]
        video = fused(video)
        patches, gt, gh, gw = vp.Qwen2VLVideoProcessor.patchify(None, video, 14, 2, 2)
        return patches[0].numpy(), (gt, gh, gw)

    return run


@pytest.fixture(scope="module")
def hf_processor(tok_dir, hf_fe, hf_ip, hf_video_oracle):
    """HF Qwen2_5OmniProcessor with the VideoProcessorMixin patch (§14.9) and the oracle video processor."""
    import transformers
    import transformers.processing_utils as pu
    from transformers.video_processing_utils import VideoProcessorMixin

    for mod in (transformers, pu.transformers_module):
        if not hasattr(mod, "VideoProcessorMixin"):
            setattr(mod, "VideoProcessorMixin", VideoProcessorMixin)

    class OracleVideoProcessor(VideoProcessorMixin):
        temporal_patch_size = 2
        merge_size = 2
        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __init__(self):
            pass

        def __call__(self, videos, **kwargs):
            out = [hf_video_oracle(v) for v in videos]
            return {"pixel_values_videos": np.concatenate([p for p, _ in out]),
                    "video_grid_thw": np.asarray([g for _, g in out], np.int64)}

    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    return transformers.Qwen2_5OmniProcessor(image_processor=hf_ip, video_processor=OracleVideoProcessor(),
                                             feature_extractor=hf_fe, tokenizer=tok)


def _hf_audio(hf_fe, clips):
    out = hf_fe(clips, sampling_rate=SR, return_attention_mask=True, padding="max_length", return_tensors="np")
    return out["input_features"], out["attention_mask"]


# ------------------------------------------------------------------------------------------------ audio
def test_mel_filter_bank(hf_fe):
    import librosa

    ours = slaney_mel_filter_bank(201, 128, 16000)
    np.testing.assert_allclose(ours, hf_fe.mel_filters, rtol=0, atol=1e-12)
    ref = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128, fmin=0.0, fmax=8000.0, htk=False, norm="slaney")
    np.testing.assert_allclose(ours, ref.T, rtol=0, atol=1e-8)  # librosa builds it in float32


def _float64_reference(clip: np.ndarray, hf_fe) -> np.ndarray:
    """HF's torch math in float64 (same padding, window, filterbank, clamp) as an exact reference."""
    import torch

    buf = np.zeros(4_800_000)
    buf[: len(clip)] = clip[:4_800_000]
    stft = torch.stft(torch.from_numpy(buf), 400, 160, window=torch.hann_window(400, dtype=torch.float64),
                      return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(hf_fe.mel_filters.astype(np.float32).astype(np.float64)).T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).numpy()


def test_audio_features_vs_hf(hf_fe):
    clips = [M.test_signal(s, SR, seed=i) for i, s in enumerate((0.3, 2.3, 40.0, 7.01))]
    ref, ref_mask = _hf_audio(hf_fe, clips)
    feats, mask = extract_features(clips, pad_to_max=True)
    assert feats.shape == ref.shape == (4, 128, 30000) and feats.dtype == np.float32
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask.dtype == ref_mask.dtype == np.int32
    np.testing.assert_array_equal(mask.sum(1), [30, 230, 4000, 701])
    np.testing.assert_allclose(feats, ref, rtol=0, atol=AUDIO_TOL)
    np.testing.assert_allclose(feats[3], _float64_reference(clips[3], hf_fe), rtol=0, atol=F64_TOL)

    # Default mode: frames up to the longest clip rounded to 200; valid frames bit-identical to pad_to_max.
    short, short_mask = extract_features(clips)
    assert short.shape == (4, 128, 4000)
    np.testing.assert_array_equal(short, feats[:, :, :4000])
    np.testing.assert_array_equal(short_mask, mask[:, :4000])
    one, _ = extract_features(clips[:2])
    assert one.shape == (2, 128, 400)
    np.testing.assert_array_equal(one, feats[:2, :, :400])
    assert audio_token_count(230) == 57 and audio_token_count(100) == 25


def test_audio_padding_frames_above_valid_max(hf_fe):
    """A loud burst in the last samples: the first *padding* frame (centred just after the clip) holds more
    energy than any valid frame, so it sets the dynamic-range floor in HF. We must include it."""
    n = 16000 + 150
    clip = (0.001 * M.test_signal(n / SR, SR, seed=9)).astype(np.float32)
    clip[-12:] = 0.9 * np.sign(np.sin(np.arange(12)))
    ref, ref_mask = _hf_audio(hf_fe, [clip])
    valid = int(ref_mask.sum())
    full = _float64_reference(clip, hf_fe)  # the clamp keeps the maximum itself
    assert full[:, valid:].max() > full[:, :valid].max() + 0.1  # a padding frame is the loudest
    ours, mask = extract_features([clip])
    np.testing.assert_array_equal(mask[0, :valid], 1)
    np.testing.assert_allclose(ours[0, :, :valid], ref[0, :, :valid], rtol=0, atol=AUDIO_TOL)
    full_ours, _ = extract_features([clip], pad_to_max=True)
    np.testing.assert_allclose(full_ours, ref, rtol=0, atol=AUDIO_TOL)
    np.testing.assert_array_equal(full_ours[0, :, : ours.shape[-1]], ours[0])


def test_audio_longer_than_300s(hf_fe):
    # 300.5 s is truncated to 300 s; 4,799,750 samples end inside HF's end reflect padding region
    clips = [M.test_signal(300.5, SR, seed=5), M.test_signal(4_799_750 / SR, SR, seed=6)]
    ref, ref_mask = _hf_audio(hf_fe, clips)
    ours, mask = extract_features(clips)
    assert ours.shape == (2, 128, 30000)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=AUDIO_TOL)
    np.testing.assert_allclose(ours[1], _float64_reference(clips[1], hf_fe), rtol=0, atol=F64_TOL)


def test_audio_bucketed_equals_padded_all_lengths(hf_fe):
    """Edge lengths around the hop / half-window: bucketed frames == pad_to_max frames == HF (masks exact)."""
    lengths = [1, 159, 161, 200, 201, 359, 361, 32_159]
    clips = [M.test_signal(n / SR, SR, seed=n)[:n] for n in lengths]
    assert [len(c) for c in clips] == lengths
    full, full_mask = extract_features(clips, pad_to_max=True)
    ref, ref_mask = _hf_audio(hf_fe, clips)
    np.testing.assert_array_equal(full_mask, ref_mask)
    np.testing.assert_allclose(full, ref, rtol=0, atol=AUDIO_TOL)
    for bucket in (1, 7, 200, 3000):
        short, mask = extract_features(clips, pad_to_multiple_of=bucket)
        assert short.shape[-1] == min(30000, -(-201 // bucket) * bucket)
        np.testing.assert_array_equal(short, full[:, :, : short.shape[-1]])
        np.testing.assert_array_equal(mask, full_mask[:, : short.shape[-1]])


@pytest.mark.parametrize("name", ["a44k_stereo.wav", "a8k.wav", "a22k_float.wav", "a16k.wav"])
def test_audio_file_resampling(media_dir, hf_fe, name):
    """load_audio == librosa.load(path, sr=16000) (qwen-omni-utils): mono mean, soxr HQ, fix_length."""
    import librosa

    ref, sr = librosa.load(str(media_dir / name), sr=SR)
    ours = load_audio(media_dir / name)
    assert ours.dtype == np.float32 and sr == SR
    np.testing.assert_array_equal(ours, ref)
    if name == "a44k_stereo.wav":
        feats, mask = extract_features([ours], pad_to_max=True)
        hf_feats, hf_mask = _hf_audio(hf_fe, [ref])
        np.testing.assert_array_equal(mask, hf_mask)
        np.testing.assert_allclose(feats, hf_feats, rtol=0, atol=AUDIO_TOL)


def test_audio_arrays():
    x = M.test_signal(1.0, 44100, channels=2, seed=3)  # [n, 2]
    mono = load_audio(x, source_rate=44100)
    assert mono.shape == (16000,)
    np.testing.assert_array_equal(load_audio(x.T, source_rate=44100), mono)
    pcm = (x[:, 0] * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm, source_rate=16000), pcm / 32768.0, atol=0)
    with pytest.raises(MediaError, match="empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(MediaError, match="NaN"):
        load_audio(np.array([0.0, np.nan], np.float32))


def test_processor_too_short_audio(processor):
    ok = processor([[{"role": "user", "content": [{"type": "audio", "audio": np.full(321, 0.1, np.float32)}]}]])
    assert (ok["input_ids"] == AUDIO_TOKEN_ID).sum() == 1
    with pytest.raises(MediaError, match=r"conversation 0, message 0, part 0 \(audio .*too short \(320 samples"):
        processor([[{"role": "user", "content": [{"type": "audio", "audio": np.full(320, 0.1, np.float32)}]}]])


# ------------------------------------------------------------------------------------------------ images
def _hf_image(hf_ip, image):
    out = hf_ip(images=[image], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


@pytest.mark.parametrize("size_mode", [
    (223, 97, "RGB"), (29, 29, "RGB"), (14, 14, "RGB"), (2000, 1500, "RGB"), (3000, 20, "RGB"), (20, 3900, "RGB"),
    (50, 61, "RGBA"), (64, 40, "L"), (64, 41, "LA"), (77, 91, "P"), (77, 91, "PT"), (90, 70, "CMYK"),
    (300, 200, "I;16"),
])
def test_images_vs_hf(hf_ip, tmp_path, size_mode):
    w, h, mode = size_mode
    ext = ".jpg" if mode == "CMYK" else (".tif" if mode == "I;16" else ".png")
    path = M.write_image(tmp_path / f"im{ext}", w, h, mode, index=w)
    image = load_image(path)
    ref, ref_grid = _hf_image(hf_ip, Image.open(path))
    ours, grid = preprocess_image(image)
    assert grid == ref_grid
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (np.prod(grid), 1176)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)  # in practice bit-identical


def test_image_arrays_and_files(hf_ip, media_dir):
    rgb = M.test_frame(123, 77, 3)
    np.testing.assert_array_equal(preprocess_image(rgb)[0], _hf_image(hf_ip, rgb)[0])
    rgba = np.concatenate([rgb, np.full((77, 123, 1), 100, np.uint8)], axis=-1)
    np.testing.assert_array_equal(preprocess_image(rgba)[0], _hf_image(hf_ip, rgba)[0])
    for name in ("odd.png", "odd.jpg", "rgba.png"):
        ours, grid = preprocess_image(load_image(media_dir / name))
        ref, ref_grid = _hf_image(hf_ip, Image.open(media_dir / name))
        assert grid == ref_grid
        np.testing.assert_array_equal(ours, ref)
    assert preprocess_image(load_image(media_dir / "odd.png"))[1] == (1, 6, 16)  # 223x97 -> 224x84


def test_image_errors(media_dir):
    with pytest.raises(ValueError, match=r"1x40 pixels; both sides must be at least 14"):
        preprocess_image(load_image(media_dir / "tiny.png"))
    with pytest.raises(ValueError, match="aspect ratio 300.0 is more than 200"):
        preprocess_image(np.zeros((20, 6000, 3), np.uint8))
    # min_side=0 accepts what HF accepts (a 1-pixel row is upscaled)
    assert preprocess_image(load_image(media_dir / "tiny.png"), ImageProcessorConfig(min_side=0))[1] == (1, 26, 2)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((30, 30, 3), np.float32))


# ------------------------------------------------------------------------------------------------ videos
@pytest.mark.parametrize("total,video_fps", [(40, 10.0), (129, 30.0), (7, 25.0), (2, 30.0), (3, 1.0),
                                             (901, 29.97), (100000, 30.0), (61, 24.0)])
def test_frame_sampling(total, video_fps):
    """qwen-omni-utils smart_nframes + torch.linspace(0, total-1, n).round()."""
    import torch

    n = smart_nframes(total, video_fps)
    want = total / video_fps * 2
    want = min(max(want, 4), min(768, total) // 2 * 2, total)
    assert n == int(want // 2 * 2) and n % 2 == 0 and 2 <= n <= min(768, total)
    ref = torch.linspace(0, total - 1, n).round().long().numpy()
    np.testing.assert_array_equal(frame_indices(total, n), ref)
    for m in (2, 4, 6, 10, 13, 768):  # other lengths too, for the float32 halfway rule
        if m <= total:
            np.testing.assert_array_equal(frame_indices(total, m), torch.linspace(0, total - 1, m).round().long())
    with pytest.raises(ValueError, match="at least 2 frames"):
        smart_nframes(1, 30.0)


def test_frame_pixel_budget():
    assert frame_max_pixels(8) == 768 * 28 * 28
    assert frame_max_pixels(768) == max(min(602112, 90316800 / 768 * 2), 105369)  # 235200.0
    assert frame_max_pixels(768) == 235200.0


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.mkv", "frames", "array_odd"])
def test_video_vs_hf_pieces(media_dir, hf_video_oracle, name):
    if name == "array_odd":
        frames = np.stack([M.test_frame(90, 50, i) for i in range(5)])  # T odd -> last frame repeated
        video = load_video(frames)
    else:
        video = load_video(media_dir / name)
    patches, grid, seconds = preprocess_video(video.frames, fps=video.fps)
    ref, ref_grid = hf_video_oracle(video.frames)
    assert grid == ref_grid
    np.testing.assert_array_equal(patches, ref)
    assert seconds == 1.0
    expected_t = {"clip.mp4": 8, "clip.webm": 6, "clip.mkv": 4, "frames": 11, "array_odd": 5}[name]
    assert video.frames.shape[0] == expected_t and grid[0] == (expected_t + 1) // 2


def test_video_decoding(media_dir):
    v = load_video(media_dir / "clip.mp4")
    assert (v.total_frames, v.video_fps, v.frames.shape) == (40, 10.0, (8, 240, 320, 3))
    # sampled indices round(linspace(0, 39, 8)) = 0, 6, 11, 17, 22, 28, 33, 39: the moving square's position
    # (7 px per frame in x) in the decoded frames tells which frames were taken
    idx = frame_indices(40, 8)
    for frame, i in zip(v.frames, idx):
        err = np.abs(frame.astype(int) - M.test_frame(320, 240, int(i)).astype(int)).mean()
        assert err < 3, (i, err)
    folder = load_video(media_dir / "frames")  # natural order: frame_2 before frame_10
    for k, frame in enumerate(folder.frames):
        np.testing.assert_array_equal(frame, M.test_frame(100, 60, k))


def test_video_frame_pair_equals_image(hf_ip):
    """Two identical frames = one image for the vision tower (same patch layout); the normalisation rounding
    differs (fused video path vs rescale-then-normalise image path) by at most a float32 ulp or two."""
    frame = M.test_frame(336, 308, 0)  # already a multiple of 28 within the video budget: no resize
    patches, grid, _ = preprocess_video(np.stack([frame, frame]))
    ref, ref_grid = _hf_image(hf_ip, frame)
    assert grid == ref_grid
    np.testing.assert_allclose(patches, ref, rtol=0, atol=1e-6)


def test_video_resize_vs_torch_antialias():
    """The documented deviation: Pillow bicubic vs torchvision's uint8 antialiased bicubic (qwen-omni-utils)."""
    import torch

    frame = np.asarray(Image.fromarray(M.test_frame(320, 240, 5)).resize((80, 60)).resize((320, 240)))
    ours = resize_rgb(frame, 364, 476).astype(int)
    ref = torch.nn.functional.interpolate(torch.from_numpy(frame.copy()).permute(2, 0, 1)[None].contiguous(),
                                          size=(364, 476), mode="bicubic", antialias=True, align_corners=False)
    diff = np.abs(ours - ref[0].permute(1, 2, 0).numpy().astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.02


def test_video_audio_track(media_dir):
    """mkv with PCM s16 audio: the decoded track equals the written samples, mixed down and resampled the
    librosa way (mono mean of int16/32768, soxr HQ, fix_length)."""
    import librosa

    v = load_video(media_dir / "clip.mkv", load_audio_track=True)
    written = M.test_signal(2.5, 22050, 2)
    pcm = (np.clip(written, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768.0
    ref = librosa.resample(np.mean(pcm.T, axis=0), orig_sr=22050, target_sr=SR, res_type="soxr_hq")
    np.testing.assert_array_equal(v.audio, ref)
    np.testing.assert_array_equal(load_audio(media_dir / "clip.mkv"), ref)  # PyAV fallback of load_audio
    mp4 = load_video(media_dir / "clip.mp4", load_audio_track=True)
    assert abs(mp4.audio.shape[0] / SR - 4.0) < 0.05  # AAC adds a few ms of encoder delay


# ------------------------------------------------------------------------------------------------ Processor
def _hf_inputs(conversations, media_dir, tok):
    """Texts and media lists for the HF processor, media loaded independently of omni_jax where possible."""
    import librosa

    texts, images, audios, videos = [], [], [], []
    for conv in conversations:
        texts.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
        for msg in conv:
            if isinstance(msg["content"], str):
                continue
            for part in msg["content"]:
                if part["type"] == "image":
                    src = part["image"]
                    images.append(Image.open(media_dir / src) if isinstance(src, str) else src)
                elif part["type"] == "audio":
                    src = part["audio"]
                    audios.append(librosa.load(str(media_dir / src), sr=SR)[0] if isinstance(src, str) else src)
                elif part["type"] == "video":
                    src = part["video"]
                    videos.append(src if isinstance(src, np.ndarray) else load_video(media_dir / src).frames)
    return texts, images or None, audios or None, videos or None


def _compare(ours, ref, keys):
    assert set(ours) == set(keys), (sorted(ours), sorted(keys))
    for k in keys:
        r = np.asarray(ref[k])
        if k == "input_features":
            assert ours[k].shape == r.shape
            np.testing.assert_allclose(ours[k], r, rtol=0, atol=AUDIO_TOL)
        elif k in ("pixel_values", "pixel_values_videos"):
            assert ours[k].shape == r.shape
            np.testing.assert_allclose(ours[k], r, rtol=0, atol=1e-6)
        elif k == "video_second_per_grid":
            np.testing.assert_allclose(ours[k], r.astype(np.float32))
        else:
            np.testing.assert_array_equal(ours[k], r, err_msg=k)
            assert ours[k].dtype == r.dtype, (k, ours[k].dtype, r.dtype)


def test_processor_vs_hf(processor, hf_processor, media_dir):
    rgba = Image.open(media_dir / "rgba.png")
    short_audio = M.test_signal(0.3, SR, seed=11)
    conversations = [
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": [{"type": "image", "image": "odd.png"}, {"type": "text", "text": "What? "},
                                      {"type": "audio", "audio": "a44k_stereo.wav"}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": short_audio}, {"type": "text", "text": "Hi"},
                                      {"type": "image", "image": rgba}]},
         {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Describe the sound ✓."}],
        [{"role": "user", "content": "Text only, a longer one to change the padding. " * 3}],
        [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Go"},
                                      {"type": "image", "image": "odd.jpg"}]}],
    ]
    ours = processor(conversations, base_dir=media_dir, pad_audio_to_max=True)
    texts, images, audios, videos = _hf_inputs(conversations, media_dir, hf_processor.tokenizer)
    ref = hf_processor(text=texts, images=images, audio=audios, videos=videos, return_tensors="np", padding=True)
    keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "input_features",
            "feature_attention_mask", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"]
    _compare(ours, ref, keys)
    mask = ours["attention_mask"]
    assert (np.diff(mask, axis=1) >= 0).all() and (mask == 0).any()  # left padding
    assert (ours["input_ids"][mask == 0] == 151643).all()

    # default (bucketed) audio: same valid frames, shorter axis
    short = processor(conversations, base_dir=media_dir)
    assert short["input_features"].shape == (2, 128, 400)
    np.testing.assert_array_equal(short["input_features"], ours["input_features"][:, :, :400])
    for k in ("input_ids", "attention_mask", "pixel_values", "pixel_values_videos"):
        np.testing.assert_array_equal(short[k], ours[k])

    right = processor(conversations[:3], base_dir=media_dir, padding_side="right")
    n = right["attention_mask"].sum(1)
    for b in range(3):
        np.testing.assert_array_equal(right["input_ids"][b, : n[b]], ours["input_ids"][b, -n[b]:])
    assert set(processor(conversations[2:3])) == {"input_ids", "attention_mask"}


def test_processor_audio_in_video_vs_hf(processor, hf_processor, media_dir):
    frames = np.stack([M.test_frame(150, 100, i) for i in range(7)])
    track = M.test_signal(3.3, SR, seed=21)
    conversations = [
        [{"role": "user", "content": [{"type": "audio", "audio": "a16k.wav"},
                                      {"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Both?"}]}],
        [{"role": "user", "content": [{"type": "video", "video": "clip.webm"}]}],
        # frames already sampled at 2 fps (7 -> last repeated) with a separate 3.3-s track
        [{"role": "user", "content": [{"type": "text", "text": "And"},
                                      {"type": "video", "video": frames, "audio_track": track}]}],
    ]
    ours = processor(conversations, base_dir=media_dir, use_audio_in_video=True, pad_audio_to_max=True)
    texts, _, _, videos = _hf_inputs(conversations, media_dir, hf_processor.tokenizer)
    import librosa

    tracks = [load_video(media_dir / n, load_audio_track=True).audio for n in ("clip.mp4", "clip.webm")]
    audios = [librosa.load(str(media_dir / "a16k.wav"), sr=SR)[0], tracks[0], tracks[1], track]
    ref = hf_processor(text=texts, videos=videos, audio=audios, audio_from_video_indices=[None, 0, 1, 2],
                       load_audio_from_video=True, return_tensors="np", padding=True)
    _compare(ours, ref, ["input_ids", "attention_mask", "input_features", "feature_attention_mask",
                         "pixel_values_videos", "video_grid_thw", "video_second_per_grid"])


def test_audio_in_video_worked_example(processor, media_dir):
    """Spec §3.5: 8 frames at 308x336 plus 4 s of audio -> <vb> <ab> Vx264 Ax50 Vx264 Ax50 <ae> <ve>."""
    ids = interleave_video_audio((4, 22, 24), 1.0, 100)
    assert ids == [AUDIO_BOS_ID] + ([VIDEO_TOKEN_ID] * 264 + [AUDIO_TOKEN_ID] * 50) * 2 + [AUDIO_EOS_ID]
    batch = processor([[{"role": "user", "content": [{"type": "video", "video": "example.mp4"}]}]],
                      base_dir=media_dir, use_audio_in_video=True)
    assert batch["video_grid_thw"].tolist() == [[4, 22, 24]]
    seq = batch["input_ids"][0].tolist()
    start = seq.index(VISION_BOS_ID)
    runs, prev = [], None
    for tok in seq[start: seq.index(VISION_EOS_ID) + 1]:
        if tok == prev:
            runs[-1][1] += 1
        else:
            runs.append([tok, 1])
        prev = tok
    assert runs == [[VISION_BOS_ID, 1], [AUDIO_BOS_ID, 1], [VIDEO_TOKEN_ID, 264], [AUDIO_TOKEN_ID, 50],
                    [VIDEO_TOKEN_ID, 264], [AUDIO_TOKEN_ID, 50], [AUDIO_EOS_ID, 1], [VISION_EOS_ID, 1]]
    assert batch["feature_attention_mask"].sum() in range(400, 405)  # 4 s (+ AAC delay)


def test_processor_errors(processor, media_dir):
    def conv(part):
        return [[{"role": "user", "content": "fine"}],
                [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]]

    cases = [
        ({"type": "video", "video": "truncated.mp4"}, r"conversation 1, message 0, part 1 \(video\).*truncated\.mp4"),
        ({"type": "image", "image": "corrupt.png"}, r"conversation 1, message 0, part 1 \(image\).*corrupt\.png"),
        ({"type": "image", "image": "truncated.png"}, r"part 1 \(image\).*truncated\.png.*truncated"),
        ({"type": "audio", "audio": "missing.wav"}, r"part 1 \(audio\): audio file not found: .*missing\.wav"),
        ({"type": "audio", "audio": "empty.wav"}, r"part 1 \(audio\).*empty\.wav.* is empty"),
        ({"type": "image", "image": "tiny.png"}, r"part 1 \(image .*tiny\.png.*at least 14 pixels"),
        ({"type": "video", "video": "missing.mp4"}, r"video file not found: .*missing\.mp4"),
    ]
    for part, pattern in cases:
        with pytest.raises(MediaError, match=pattern):
            processor(conv(part), base_dir=media_dir)
    with pytest.raises(MediaError, match=r"silent\.mp4.*no audio track"):
        processor(conv({"type": "video", "video": "silent.mp4"}), base_dir=media_dir, use_audio_in_video=True)
    assert issubclass(MediaError, ValueError)
    with pytest.raises(ValueError, match=r"conversation 0: the prompt has 2 <\|IMAGE\|> tokens but 1 image parts"):
        processor([[{"role": "user", "content": [{"type": "text", "text": "<|IMAGE|>"},
                                                 {"type": "image", "image": M.test_frame(56, 56)}]}]])
    with pytest.raises(ValueError, match="conversation 0: message 0: unknown role"):
        processor([[{"role": "robot", "content": "x"}]])


def test_processor_from_pretrained_configs(tok_dir, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    for f in os.listdir(tok_dir):
        (d / f).write_bytes((tok_dir / f).read_bytes())
    assert Processor.from_pretrained(d).image_config == ImageProcessorConfig()
    released = {"chunk_length": 300, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": 128, "hop_length": 160, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "max_pixels": 12845056, "merge_size": 2,
                "min_pixels": 3136, "n_fft": 400, "n_samples": 4800000, "nb_max_frames": 30000,
                "padding_side": "right", "padding_value": 0.0, "patch_size": 14,
                "processor_class": "Qwen2_5OmniProcessor", "return_attention_mask": True, "sampling_rate": 16000,
                "temporal_patch_size": 2}
    (d / "preprocessor_config.json").write_text(json.dumps(released))
    p = Processor.from_pretrained(d)
    assert p.audio_config == AudioFeatureConfig() and p.image_config == ImageProcessorConfig()
    assert p.video_config == VideoProcessorConfig()
    (d / "preprocessor_config.json").write_text(json.dumps({**released, "max_pixels": 200704}))
    (d / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 3136,
                                                                           "longest_edge": 50176}}))
    p = Processor.from_pretrained(d)
    assert p.image_config.max_pixels == 200704
    assert (p.video_config.min_pixels, p.video_config.max_pixels) == (3136, 50176)
    big = p([[{"role": "user", "content": [{"type": "image", "image": M.test_frame(1000, 800)}]}]])
    assert int(np.prod(big["image_grid_thw"][0])) * 196 <= 200704
