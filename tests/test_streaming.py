"""Streaming Token2Wav (omni_jax/streaming.py): released chunking, first-chunk latency, equality with
whole-utterance synthesis within a measured tolerance, bad inputs; streamed audio through OmniModel.generate and
the CLI's --audio-out / --stream-audio on a tiny random checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from transformers import Qwen2_5OmniDiTConfig
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf_omni
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig

from hf_models import randomize_bigvgan_, randomize_dit_
from omni_jax.config import OmniConfig, RuntimeOptions, apply_overrides
from omni_jax.models import bigvgan as bigvgan_lib
from omni_jax.models import dit as dit_lib
from omni_jax.speech import SpeechModel
from omni_jax.streaming import StreamingToken2Wav, StreamLayout
from omni_jax.voices import Voice

# The released layout: 3-block chunks (72 mel frames), DiT context 2 blocks back / 1 ahead, BigVGAN overlap
# 20 frames; 2 mel frames per codec token, 240 samples per frame.
FIRST_CHUNK_TOKENS = 48  # (72 + 24) / 2: the chunk's 3 blocks plus the 1 look-ahead block
FIRST_CHUNK_SAMPLES = 52 * 240  # frames [0, 52): the last 20 frames wait for the next chunk's vocoder context
CHUNK_TOKENS, CHUNK_SAMPLES = 36, 72 * 240
N_CODES = 150  # 300 mel frames: chunks at 48, 84, 120 tokens, then finish() emits frames [196, 300)

# Streamed vs whole-utterance waveform, same noise. They cannot be equal: a chunk's DiT window holds only 2 blocks
# of look-back and 1 of look-ahead, so the ODE states of its edge blocks are computed without their own context,
# and 36 DiT calls carry that difference into the chunk; BigVGAN sees 20 frames of context where its receptive
# field is a few frames wider. Measured on this model (DiT with the released receptive field, weights ~N(0,
# 1/fan_in), unclamped BigVGAN): mel max |diff| 1.1e-3 (relative L2 6e-5, largest in the last block of each chunk),
# waveform max |diff| 7.7e-5, relative L2 2.2e-5; over 3 more draws of codes/noise/voice up to 1.7e-4 and 3.7e-5.
# The bounds below leave ~3x room over the worst draw; a wrong noise position, a misplaced window or a lost chunk
# gives O(1) errors (checked below).
WAVE_REL_L2, WAVE_MAX_ABS = 1e-4, 5e-4
# Same computation up to masked (exactly zero-weight) padded keys and XLA's reduction order.
EXACT_ATOL = 1e-5


@pytest.fixture(scope="module")
def speech():
    """Token2Wav only (no talker): tiny DiT with the released receptive field (look-back layers 0 and 2,
    look-ahead layer 1, like the release's 0/20 and 10) and a tiny BigVGAN, via the HF weight converters."""
    cfg = apply_overrides(OmniConfig.from_yaml("configs/models/tiny.yaml"), {
        "token2wav.dit.num_hidden_layers": 3, "token2wav.dit.look_ahead_layers": [1],
        "token2wav.dit.look_backward_layers": [0, 2]})
    dit_cfg, voc_cfg = cfg.token2wav.dit, cfg.token2wav.bigvgan
    hf_cfg = Qwen2_5OmniDiTConfig(**dit_cfg.to_hf_config())
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dit = hf_omni.Qwen2_5OmniToken2WavDiTModel(hf_cfg)
    randomize_dit_(dit)
    vocoder = randomize_bigvgan_(hf_omni.Qwen2_5OmniToken2WavBigVGANModel(
        Qwen2_5OmniBigVGANConfig(**voc_cfg.to_hf_config())), seed=2)
    dit_params = dit_lib.hf_to_params({k: v.numpy() for k, v in dit.state_dict().items()}, dit_cfg)
    voc_params = bigvgan_lib.hf_to_params({k: v.numpy() for k, v in vocoder.state_dict().items()}, voc_cfg)
    rng = np.random.default_rng(5)
    voices = {name: Voice(rng.normal(size=192).astype(np.float32), rng.normal(size=(60, 80)).astype(np.float32), bos)
              for name, bos in (("Chelsie", 151870), ("Ethan", 151871))}
    params = {"talker": {}, "token2wav": {"code2wav_dit_model": dit_params, "code2wav_bigvgan_model": voc_params}}
    return SpeechModel(cfg, params, RuntimeOptions(), voices)


@pytest.fixture(scope="module")
def streamed(speech):
    """N_CODES codes pushed one at a time: (codes, chunks, token count at each chunk, DiT mel per chunk)."""
    codes = np.random.default_rng(0).integers(0, 8193, N_CODES)
    mels = []
    stream = StreamingToken2Wav(speech, "Chelsie", seed=3, on_mel=lambda row, first, mel: mels.append((first, mel)))
    chunks, counts = [], []
    for i in range(N_CODES):
        for chunk in stream.push(codes[i:i + 1]):
            chunks.append(chunk)
            counts.append(i + 1)
    tail = stream.finish()
    return codes, chunks, counts, tail, mels


def test_layout_is_the_release():
    layout = StreamLayout()
    assert (layout.chunk, layout.past, layout.future, layout.window) == (72, 48, 24, 144)
    assert layout.first_chunk_tokens == FIRST_CHUNK_TOKENS and layout.chunk_tokens == CHUNK_TOKENS


def test_first_chunk_latency_and_chunk_sizes(streamed):
    codes, chunks, counts, tail, mels = streamed
    assert counts == [FIRST_CHUNK_TOKENS, FIRST_CHUNK_TOKENS + CHUNK_TOKENS, FIRST_CHUNK_TOKENS + 2 * CHUNK_TOKENS]
    assert [len(c) for c in chunks] == [FIRST_CHUNK_SAMPLES, CHUNK_SAMPLES, CHUNK_SAMPLES]
    assert [len(c) for c in tail] == [(300 - 196) * 240]
    assert sum(len(c) for c in chunks + tail) == N_CODES * 480
    assert [first for first, _ in mels] == [0, 72, 144, 216] and [len(m) for _, m in mels] == [72, 72, 72, 84]
    assert all(c.dtype == np.float32 for c in chunks + tail)


def test_streamed_equals_whole_utterance_within_tolerance(speech, streamed):
    codes, chunks, _, tail, mels = streamed
    voice = speech.speakers["Chelsie"]
    whole_mel = speech.mel(codes, voice, seed=3)  # [80, 300], same per-position noise
    whole = speech.vocode(whole_mel)
    wave = np.concatenate(chunks + tail)
    assert np.mean(np.abs(whole) >= 1.0) < 0.05  # not a comparison of clamped samples
    err = wave - whole
    rel = np.linalg.norm(err) / np.linalg.norm(whole)
    assert rel < WAVE_REL_L2 and np.abs(err).max() < WAVE_MAX_ABS, (rel, np.abs(err).max())
    mel_err = np.concatenate([m for _, m in mels]) - whole_mel.T
    assert 0 < np.abs(mel_err).max() < 1e-2  # bounded context: close, not identical
    # The tolerance discriminates: another seed (other start noise) is O(1) away.
    other = speech.token2wav(codes, voice, seed=4)
    assert np.linalg.norm(other - whole) / np.linalg.norm(whole) > 0.1


def test_dit_chunks_are_the_release_windows(speech, streamed):
    """The last chunk's DiT output equals the flow-matching sampler run on the release's unpadded window
    [72k − 48, end) = frames [168, 300) (start noise of those positions), frames [216, 300) kept: the padded,
    masked 144-frame window computes exactly that."""
    import jax

    from omni_jax.models.flow_matching import sample_mel
    from omni_jax.speech import position_noise

    codes, _, _, _, mels = streamed
    first, last_mel = mels[-1]
    assert first == 216
    voice = speech.speakers["Chelsie"]
    noise = position_noise(jax.random.key(3), 168, num_frames=132, mel_dim=80, block_size=24)
    ref = sample_mel(speech.dit.apply, {"params": speech.dit_params}, codes[None, 84:150], voice.cond[None],
                     voice.ref_mel[None], noise[None])  # [1, 80, 132]
    np.testing.assert_allclose(last_mel, np.asarray(ref)[0].T[216 - 168:], atol=EXACT_ATOL)


def test_short_utterance_is_one_exact_chunk(speech):
    """Under 48 tokens nothing streams; finish() synthesises the whole utterance in one padded window, which
    equals the whole-utterance path (the frame mask makes padding inert)."""
    codes = np.random.default_rng(1).integers(0, 8193, 30)
    stream = StreamingToken2Wav(speech, "Ethan", seed=7)
    assert stream.push(codes) == []
    (chunk,) = stream.finish()
    whole = speech.token2wav(codes, speech.speakers["Ethan"], seed=7)
    np.testing.assert_allclose(chunk, whole, atol=EXACT_ATOL)


def test_batched_rows_equal_single_streams(speech, streamed):
    """Two rows (different voices, lengths and push patterns) in one stream equal each row alone."""
    codes, chunks, _, tail, _ = streamed
    other = np.random.default_rng(2).integers(0, 8193, 100)
    stream = StreamingToken2Wav(speech, ["Chelsie", "Ethan"], rows=2, seed=3)
    got = [[], []]
    for i in range(0, N_CODES, 10):
        for row, row_chunks in enumerate(stream.push_rows([codes[i:i + 10], other[i:i + 10]])):
            got[row] += row_chunks
    for row, row_chunks in enumerate(stream.finish_rows()):
        got[row] += row_chunks
    np.testing.assert_allclose(np.concatenate(got[0]), np.concatenate(chunks + tail), atol=EXACT_ATOL)
    alone = StreamingToken2Wav(speech, "Ethan", seed=4)  # row 1 draws its noise from seed + 1
    alone_wave = np.concatenate(alone.push(other) + alone.finish())
    np.testing.assert_allclose(np.concatenate(got[1]), alone_wave, atol=EXACT_ATOL)


def test_bad_inputs_are_explained(speech):
    with pytest.raises(ValueError, match="unknown speaker 'Nobody'.*Chelsie, Ethan"):
        StreamingToken2Wav(speech, "Nobody")
    stream = StreamingToken2Wav(speech, "Chelsie")
    with pytest.raises(ValueError, match=r"\[0, 8193\).*got 8292 at position 2"):
        stream.push(np.array([5, 6, 8292]))  # a talker end token
    with pytest.raises(ValueError, match="got -1 at position 0"):
        stream.push(np.array([-1]))
    with pytest.raises(ValueError, match="integers"):
        stream.push(np.array([1.5]))
    assert stream.finish() == []  # the rejected pushes added nothing
    with pytest.raises(ValueError, match="push after finish"):
        stream.push(np.arange(3))
    short_noise = StreamingToken2Wav(speech, "Chelsie", noise=[np.zeros((20, 80), np.float32)])
    assert short_noise.push(np.arange(30)) == []
    with pytest.raises(ValueError, match="noise covers 20 mel frames, the codes need 60"):
        short_noise.finish()
    with pytest.raises(ValueError, match="use push_rows"):
        StreamingToken2Wav(speech, "Chelsie", rows=2).push(np.arange(3))


# ------------------------------------------------------------------ OmniModel.generate(on_audio) and the CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from omni_jax.init_model import init_random_checkpoint

    path = str(tmp_path_factory.mktemp("tiny_omni"))
    init_random_checkpoint("configs/models/tiny.yaml", path, seed=0)
    return path


@pytest.mark.slow
def test_generate_streams_audio(tiny_checkpoint):
    from omni_jax.api import OmniModel

    model = OmniModel.from_pretrained(tiny_checkpoint)
    ids = np.random.default_rng(3).integers(100, 5000, (2, 6))
    with pytest.raises(ValueError, match="return_audio=True"):
        model.generate({"input_ids": ids}, on_audio=lambda row, chunk: None)
    kw = dict(max_new_tokens=4, eos_token_id=[151645], return_audio=True, speaker="Ethan", seed=1,
              talker={"do_sample": False, "max_new_tokens": 100, "chunk_steps": 12})
    received = [[], []]
    streamed = model.generate({"input_ids": ids}, on_audio=lambda row, chunk: received[row].append(chunk), **kw)
    whole = model.generate({"input_ids": ids}, **kw)
    for row in range(2):
        np.testing.assert_array_equal(streamed.codec_tokens[row], whole.codec_tokens[row])
        n = len(whole.codec_tokens[row])
        assert n >= FIRST_CHUNK_TOKENS + 1  # so at least one chunk streams before finish
        assert len(received[row]) >= 2 and len(received[row][0]) == FIRST_CHUNK_SAMPLES
        np.testing.assert_array_equal(np.concatenate(received[row]), streamed.audio[row])
        assert streamed.audio[row].shape == whole.audio[row].shape == (n * 480,)
        err = streamed.audio[row] - whole.audio[row]
        assert np.abs(err).max() < WAVE_MAX_ABS


@pytest.mark.slow
def test_cli_writes_and_streams_wav(tiny_checkpoint, tmp_path, capsys):
    from omni_jax.cli import main

    out = str(tmp_path / "reply.wav")
    args = ["generate", "--model", tiny_checkpoint, "--prompt", "Say hi", "--max-new-tokens", "4",
            "--max-audio-tokens", "100", "--speaker", "Chelsie", "--audio-out", out, "--stream-audio"]
    assert main(args) == 0
    wave, rate = soundfile.read(out, dtype="float32")
    assert rate == 24000 and wave.ndim == 1 and len(wave) > 0 and len(wave) % 480 == 0
    assert "wrote" in capsys.readouterr().err


def test_wav_stream_is_valid_while_open(tmp_path):
    from omni_jax.cli import _WavStream

    path = str(tmp_path / "partial.wav")
    wav = _WavStream(path, 24000)
    chunk = np.linspace(-0.5, 0.5, 12480, dtype=np.float32)
    wav.write(chunk)
    partial, rate = soundfile.read(path, dtype="float32")  # the writer has not closed the file
    np.testing.assert_array_equal(partial, chunk)
    wav.write(chunk[:100])
    wav.close()
    assert soundfile.info(path).frames == 12580 and rate == 24000


def test_cli_audio_out_needs_speech_weights(tmp_path, capsys):
    from omni_jax.cli import main

    thinker_only = tmp_path / "thinker_only"
    thinker_only.mkdir()
    config = OmniConfig.from_yaml("configs/models/tiny.yaml").to_hf_config()
    config["enable_audio_output"] = False
    (thinker_only / "config.json").write_text(json.dumps(config))
    code = main(["generate", "--model", str(thinker_only), "--prompt", "hi", "--audio-out", str(tmp_path / "a.wav")])
    assert code == 2 and "has no talker/token2wav" in capsys.readouterr().err
