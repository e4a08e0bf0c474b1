"""A tiny random Qwen2.5-Omni served by the engine tests (test_continuous, test_eval, test_server): an HF directory
with thinker, talker, token2wav, two voices and the tokenizer, and helpers for requests and engine events."""
from __future__ import annotations

from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

from hf_models import randomize_
from omni_jax.config import OmniConfig
from omni_jax.processing.tokenizer import write_qwen_tokenizer
from serve.events import AudioChunk, Failed, Finished, TextDelta

SPEAKER_BOS = {"Chelsie": 151870, "Ethan": 151871}
MAX_POSITIONS = 256  # a short context so that a "prompt too long" request is cheap to write


def build_model_dir(path, max_positions: int = MAX_POSITIONS) -> str:
    """An HF Qwen2.5-Omni directory (thinker, talker, token2wav, two voices, tokenizer) with random weights."""
    import torch

    cfg = OmniConfig.from_yaml("configs/models/tiny.yaml").to_hf_config()
    cfg["thinker_config"]["text_config"]["max_position_embeddings"] = max_positions
    hf_cfg = Qwen2_5OmniConfig(**cfg)
    torch.manual_seed(0)
    hf = randomize_(Qwen2_5OmniForConditionalGeneration(hf_cfg), seed=1).eval()
    with torch.no_grad():  # a random talker must not pick codes past the DiT's table (see test_speech)
        hf.talker.codec_head.weight[hf_cfg.token2wav_config.dit_config.num_embeds:] = 0.0
    gen = torch.Generator().manual_seed(5)
    speakers = {name: {"cond": torch.randn(192, generator=gen), "ref_mel": torch.randn(1, 60, 80, generator=gen),
                       "bos_token": bos} for name, bos in SPEAKER_BOS.items()}
    hf.save_pretrained(path)
    torch.save(speakers, path / "spk_dict.pt")
    write_qwen_tokenizer(path)
    return str(path)


def user(*parts):
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def collect(events):
    """Engine events -> (text deltas joined per id, audio chunks per id, Finished per id, error per id)."""
    deltas, chunks, finished, failed = {}, {}, {}, {}
    for ev in events:
        if isinstance(ev, TextDelta):
            deltas[ev.id] = deltas.get(ev.id, "") + ev.text
        elif isinstance(ev, AudioChunk):
            chunks.setdefault(ev.id, []).append(ev)
        elif isinstance(ev, Finished):
            finished[ev.id] = ev
        else:
            assert isinstance(ev, Failed)
            failed[ev.id] = ev.error
    return deltas, chunks, finished, failed
