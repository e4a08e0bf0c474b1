"""Thinker logits with audio, image and video inputs (and audio-in-video) against HF transformers (float32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_models import build_thinker
from omni_jax.api import OmniModel

# Same reason as in test_thinker: float32 on both sides, O(1-10) logits, differences from summation order.
LOGITS_ATOL = 1e-4

PAD, TEXT_LO, TEXT_HI = 151643, 100, 5000
VB, VE, AB, AE = 151652, 151653, 151647, 151648
AUDIO, IMAGE, VIDEO = 151646, 151655, 151656


def audio_tokens(frames: int) -> int:
    f1 = (frames - 1) // 2 + 1
    return (f1 - 2) // 2 + 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = build_thinker(vocab=151936, hidden=64, heads=4, kv_heads=2, seed=3)
    path = tmp_path_factory.mktemp("mm")
    hf.save_pretrained(path)
    return hf, OmniModel.from_pretrained(str(path))


def _text(rng, n):
    return list(rng.integers(TEXT_LO, TEXT_HI, n))


def _left_pad(rows):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def _features(rng, frame_counts, total=400):
    feats = rng.normal(size=(len(frame_counts), 128, total)).astype(np.float32)
    mask = np.zeros((len(frame_counts), total), np.int64)
    for i, n in enumerate(frame_counts):
        mask[i, :n] = 1
    return feats, mask


def _compare(hf, ours, batch, use_audio_in_video=False):
    torch_batch = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        ref = hf(**torch_batch, use_audio_in_video=use_audio_in_video).logits.numpy()
    got = ours.thinker_logits(batch, use_audio_in_video=use_audio_in_video)
    valid = batch["attention_mask"].astype(bool)
    err = np.abs(got - ref)[valid].max()
    assert err < LOGITS_ATOL, f"max |logits - HF| = {err}"
    assert np.abs(ref[valid]).max() > 1.0


def test_text_image_audio_video_batch(models):
    hf, ours = models
    rng = np.random.default_rng(0)
    image_grids = np.array([[1, 4, 6], [1, 2, 2]])  # 6 and 1 merged tokens
    video_grids = np.array([[2, 4, 4]])  # 8 tokens over 2 temporal grids
    frames = [230, 90]  # 57 and 22 audio tokens
    row0 = (_text(rng, 5) + [VB] + [IMAGE] * 6 + [VE] + _text(rng, 3) + [AB] + [AUDIO] * audio_tokens(230) + [AE]
            + [VB] + [VIDEO] * 8 + [VE] + _text(rng, 4))
    row1 = _text(rng, 2) + [AB] + [AUDIO] * audio_tokens(90) + [AE] + [VB] + [IMAGE] * 1 + [VE] + _text(rng, 3)
    ids, mask = _left_pad([row0, row1])
    feats, feat_mask = _features(rng, frames)
    patches = lambda grids: rng.normal(size=(int(np.prod(grids, 1).sum()), 1176)).astype(np.float32)  # noqa: E731
    batch = {
        "input_ids": ids, "attention_mask": mask,
        "input_features": feats, "feature_attention_mask": feat_mask,
        "pixel_values": patches(image_grids), "image_grid_thw": image_grids,
        "pixel_values_videos": patches(video_grids), "video_grid_thw": video_grids,
        "video_second_per_grid": np.array([0.5], np.float32),
    }
    _compare(hf, ours, batch)


def test_audio_in_video(models):
    hf, ours = models
    rng = np.random.default_rng(1)
    # 3 temporal grids at 1 s/grid (temporal values 0, 25, 50) + 3 s of audio (75 tokens): spec §7.4 example 2
    # gives <vb><ab> V x8 A x50 V x4 A x25 <ae><ve>.
    video_grids = np.array([[3, 4, 4]])
    row = _text(rng, 4) + [VB, AB] + [VIDEO] * 8 + [AUDIO] * 50 + [VIDEO] * 4 + [AUDIO] * 25 + [AE, VE] + _text(rng, 3)
    ids, mask = _left_pad([row, _text(rng, 1) + row[4:]])  # row 1: same media, shorter text, left padded
    feats, feat_mask = _features(rng, [300, 300])
    batch = {
        "input_ids": ids, "attention_mask": mask,
        "input_features": feats, "feature_attention_mask": feat_mask,
        "pixel_values_videos": rng.normal(size=(2 * 48, 1176)).astype(np.float32),
        "video_grid_thw": np.concatenate([video_grids, video_grids]),
        "video_second_per_grid": np.array([1.0, 1.0], np.float32),
    }
    _compare(hf, ours, batch, use_audio_in_video=True)


def test_placeholder_feature_mismatch_is_an_error(models):
    _, ours = models
    rng = np.random.default_rng(2)
    ids, mask = _left_pad([_text(rng, 3) + [VB] + [IMAGE] * 5 + [VE]])
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": rng.normal(size=(24, 1176)).astype(np.float32), "image_grid_thw": np.array([[1, 4, 6]])}
    with pytest.raises(ValueError, match="image placeholder tokens"):
        ours.thinker_logits(batch)


def test_generate_with_image_and_audio_matches_hf(models):
    hf, ours = models
    rng = np.random.default_rng(4)
    grids = np.array([[1, 4, 4]])
    row = _text(rng, 3) + [VB] + [IMAGE] * 4 + [VE] + [AB] + [AUDIO] * audio_tokens(120) + [AE] + _text(rng, 2)
    ids, mask = _left_pad([row])
    feats, feat_mask = _features(rng, [120], total=200)
    batch = {"input_ids": ids, "attention_mask": mask, "input_features": feats, "feature_attention_mask": feat_mask,
             "pixel_values": rng.normal(size=(16, 1176)).astype(np.float32), "image_grid_thw": grids}
    with torch.no_grad():
        ref = hf.generate(**{k: torch.tensor(v) for k, v in batch.items()}, max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=PAD)
    out = ours.generate(batch, max_new_tokens=12, eos_token_id=[151936 + 1])
    np.testing.assert_array_equal(out.generated[0], ref.numpy()[0, ids.shape[1]:])


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_multimodal_equals_single_device(models, tmp_path_factory, mesh_shape):
    """Audio tower, vision tower and LM sharded on 8 virtual devices give the single-device logits."""
    hf, single = models
    path = tmp_path_factory.mktemp("mm_sharded")
    hf.save_pretrained(path)
    sharded = OmniModel.from_pretrained(str(path), mesh_shape=mesh_shape)
    rng = np.random.default_rng(5)
    grids = np.array([[1, 4, 4]])
    rows = [_text(rng, 3) + [VB] + [IMAGE] * 4 + [VE] + [AB] + [AUDIO] * audio_tokens(150) + [AE] + _text(rng, 2),
            _text(rng, 6)]
    ids, mask = _left_pad(rows + [list(r) for r in (_text(rng, 5), _text(rng, 9))] * 1 + [_text(rng, 4)] * 4)
    feats, feat_mask = _features(rng, [150], total=200)
    batch = {"input_ids": ids, "attention_mask": mask, "input_features": feats, "feature_attention_mask": feat_mask,
             "pixel_values": rng.normal(size=(16, 1176)).astype(np.float32), "image_grid_thw": grids}
    # Sharded matmuls sum in a different order (partial sums per shard + all-reduce): ~1e-6 relative.
    np.testing.assert_allclose(sharded.thinker_logits(batch), single.thinker_logits(batch), atol=2e-5)
