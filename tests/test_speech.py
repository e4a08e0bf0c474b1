"""Speech output against HF transformers (float32): talker logits, greedy codec tokens, Token2Wav waveform."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

from hf_models import randomize_, randomize_bigvgan_
from omni_jax.api import OmniModel
from omni_jax.config import OmniConfig

PAD, TEXT_LO, TEXT_HI = 151643, 100, 5000
SPEAKER_BOS = {"Chelsie": 151870, "Ethan": 151871}
THINKER_EOS = [151645]
# float32 on both sides; talker logits are O(1-10) after randomize_, differences come from summation order.
LOGITS_ATOL = 1e-4
# The waveform passes 36 DiT calls and BigVGAN's ~20 conv layers; the per-module parity is 1e-5-level
# (test_dit, test_bigvgan), so the end-to-end waveform gets 1e-4.
WAVE_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cfg = OmniConfig.from_yaml("configs/models/tiny.yaml")
    hf_cfg = Qwen2_5OmniConfig(**cfg.to_hf_config())
    torch.manual_seed(0)
    hf = randomize_(Qwen2_5OmniForConditionalGeneration(hf_cfg), seed=1).eval()
    randomize_bigvgan_(hf.token2wav.code2wav_bigvgan_model, seed=2)  # keep the waveform mostly unclamped
    with torch.no_grad():
        # A trained talker only emits DiT codes (< 8193) or its end tokens; a random one would also pick ids that
        # index past the DiT's codec table (HF then fails). Zero those rows: logit 0 never wins over 8193 O(1)
        # random logits, so the codes stay valid.
        hf.talker.codec_head.weight[hf_cfg.token2wav_config.dit_config.num_embeds:] = 0.0
    gen = torch.Generator().manual_seed(5)
    speakers = {name: {"cond": torch.randn(192, generator=gen), "ref_mel": torch.randn(1, 60, 80, generator=gen),
                       "bos_token": bos} for name, bos in SPEAKER_BOS.items()}
    path = tmp_path_factory.mktemp("omni_full")
    hf.save_pretrained(path)
    torch.save(speakers, path / "spk_dict.pt")
    hf.load_speakers(str(path / "spk_dict.pt"))
    return str(path), hf


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return OmniModel.from_pretrained(tiny_dir[0], thinker_only=False)


def _prompt(rng, lengths):
    total = max(lengths)
    ids = np.full((len(lengths), total), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(TEXT_LO, TEXT_HI, n)
        mask[row, total - n:] = 1
    return ids, mask


def test_talker_logits_match_hf(tiny_dir, ours):
    _, hf = tiny_dir
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(2, 9, hf.config.talker_config.embedding_size)).astype(np.float32)
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    positions = np.broadcast_to(np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[None], (3, 2, 9)).copy()
    with torch.no_grad():
        ref = hf.talker.model(inputs_embeds=hf.talker.thinker_to_talker_proj(torch.tensor(embeds)),
                              attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
        ref = hf.talker.codec_head(ref.last_hidden_state).numpy()
    speech = ours.speech
    got = speech.talker.apply({"params": speech.talker_params}, embeds, positions.astype(np.int32),
                              mask.astype(np.int32)).logits
    valid = mask.astype(bool)
    err = np.abs(np.asarray(got) - ref)[valid].max()
    assert err < LOGITS_ATOL and np.abs(ref[valid]).max() > 1.0, err


def _hf_generate(hf, ids, mask, noises, speaker, thinker_tokens, talker_tokens, monkeypatch):
    queue = [torch.from_numpy(np.asarray(n)[None]) for n in noises]
    real_randn = torch.randn

    def fake_randn(*shape, **kwargs):
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else tuple(shape)
        if queue and dims == tuple(queue[0].shape):
            return queue.pop(0).clone()
        return real_randn(*shape, **kwargs)

    codes = []
    original_forward = hf.token2wav.forward

    def recording_forward(code, *args, **kwargs):
        codes.append(code.numpy()[0].copy())
        return original_forward(code, *args, **kwargs)

    monkeypatch.setattr(torch, "randn", fake_randn)
    monkeypatch.setattr(hf.token2wav, "forward", recording_forward)
    with torch.no_grad():
        seqs, waves = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), speaker=speaker,
                                  thinker_max_new_tokens=thinker_tokens, thinker_do_sample=False,
                                  thinker_eos_token_id=THINKER_EOS, thinker_pad_token_id=PAD,
                                  talker_max_new_tokens=talker_tokens, talker_do_sample=False)
    monkeypatch.undo()
    assert not queue, "HF did not consume the injected noise"
    waves = [waves] if torch.is_tensor(waves) else waves
    return seqs.numpy(), codes, [w.numpy() for w in waves]


@pytest.mark.parametrize("speaker", ["Chelsie", "Ethan"])
def test_greedy_speech_matches_hf(tiny_dir, ours, monkeypatch, speaker):
    _, hf = tiny_dir
    rng = np.random.default_rng(1)
    ids, mask = _prompt(rng, (11, 7))
    out = ours.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=10, eos_token_id=THINKER_EOS,
                        return_audio=True, speaker=speaker, talker={"do_sample": False, "max_new_tokens": 24})
    noises = [np.random.default_rng(10 + r).normal(size=(2 * len(c), 80)).astype(np.float32)
              for r, c in enumerate(out.codec_tokens)]
    assert all(len(c) > 0 for c in out.codec_tokens)
    ours_waves = [ours.token2wav(c, speaker, noise=n) for c, n in zip(out.codec_tokens, noises)]
    seqs, hf_codes, waves = _hf_generate(hf, ids, mask, noises, speaker, 10, 24, monkeypatch)
    np.testing.assert_array_equal(np.stack(out.generated), seqs[:, ids.shape[1]:])
    for row in range(2):
        np.testing.assert_array_equal(out.codec_tokens[row], hf_codes[row])
    for row, (wave_ours, wave_hf) in enumerate(zip(ours_waves, waves)):
        assert wave_ours.shape == wave_hf.shape == (len(out.codec_tokens[row]) * 480,)
        np.testing.assert_allclose(wave_ours, wave_hf, atol=WAVE_ATOL)
        assert np.mean(np.abs(wave_hf) >= 1.0) < 0.05  # a comparison of mostly clamped samples would be weak


def test_batched_speech_equals_per_row(tiny_dir, ours):
    rng = np.random.default_rng(2)
    ids, mask = _prompt(rng, (9, 5))
    kw = dict(max_new_tokens=8, eos_token_id=THINKER_EOS, return_audio=True, talker={"do_sample": False,
                                                                                       "max_new_tokens": 16})
    both = ours.generate({"input_ids": ids, "attention_mask": mask}, **kw)
    for row, n in enumerate((9, 5)):
        alone = ours.generate({"input_ids": ids[row:row + 1, -n:], "attention_mask": mask[row:row + 1, -n:]}, **kw)
        np.testing.assert_array_equal(alone.codec_tokens[0], both.codec_tokens[row])


def test_unknown_speaker_lists_the_known_ones(ours):
    ids = np.full((1, 4), 200, np.int64)
    with pytest.raises(ValueError, match="Chelsie, Ethan"):
        ours.generate({"input_ids": ids}, max_new_tokens=4, return_audio=True, speaker="Nobody")
