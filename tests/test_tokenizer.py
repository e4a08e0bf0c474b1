"""Qwen2.5-Omni tokenizer (written from dashscope's qwen.tiktoken) and chat template, checked against HF."""
import importlib.metadata
import json
import shutil
import sys
import unicodedata

import pytest

from omni_jax.processing import tokenizer as tokmod
from omni_jax.processing.chat_template import (
    QWEN2_5_OMNI_CHAT_TEMPLATE,
    SPEECH_SYSTEM_PROMPT,
    render_chat,
)
from omni_jax.processing.tokenizer import (
    QWEN2_5_OMNI_ADDED_TOKENS,
    StreamDecoder,
    Tokenizer,
    write_qwen_tokenizer,
)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    # The vocabulary comes from the dashscope wheel, which `make test` installs; missing it is a failure.
    tokmod.find_qwen_tiktoken()
    return write_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture(scope="session")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "Hello! Who are you?"}],
    "system": [
        {"role": "system", "content": SPEECH_SYSTEM_PROMPT},
        {"role": "user", "content": "Say something."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?\n"}]},
    ],
    "mixed_media": [
        {"role": "user", "content": [
            {"type": "image", "image": "cat.png"},
            {"type": "text", "text": "What is this? "},
            {"type": "audio", "audio": "q.wav"},
            {"type": "video", "video": "clip.mp4"},
            {"type": "image_url", "image_url": "http://x/y.png"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat, meowing."}]},
        {"role": "user", "content": [{"type": "audio", "audio_url": "u.wav"}, {"type": "video", "video": "v"},
                                     {"type": "image"}, {"type": "text", "text": "你好，世界 🤖"}]},
    ],
    "assistant_last": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
    ],
}

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气怎么样？",
    "日本語のテキストと한국어 텍스트",
    "emoji 😀🤖👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "numbers 1234567890 3.14159 -42 1e-9 ١٢٣",
    "  leading and trailing   \t tabs\t\t and runs     of spaces   ",
    "line1\nline2\r\n\n\nline5\r",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}  # comment\n",
    "I'm sure you'll see they've done it. DON'T",
    "naïve café résumé: e\u0301 vs \u00e9, Å vs A\u030a, ﬁ ligature",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ≠ ≤",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "inline <|AUDIO|><|IMAGE|><|VIDEO|> specials<|endoftext|>and <tool_call>x</tool_call><|fim_prefix|>",
    "almost special <|im_start |> <|unknown|> |>",
    "",
    " ",
    "\n",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬… ¡™£¢∞§¶•ªº–≠ \x00\x01\x7f control",
]


def _all_texts():
    return TEXTS + [render_chat(c) for c in CONVERSATIONS.values()]


# ----------------------------------------------------------------------------------------------- files


def test_written_files(tok_dir):
    names = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"} <= names
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["model_max_length"] == 32768
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["chat_template"] == QWEN2_5_OMNI_CHAT_TEMPLATE
    assert {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()} == {
        i: c for i, c, _ in QWEN2_5_OMNI_ADDED_TOKENS
    }
    # Same shape as the published Qwen2 files: 151,643 BPE tokens, one merge per non-byte token, and
    # byte-for-byte the same sizes as the released vocab.json / merges.txt.
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[:8] == ["#version: 0.2", "Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r", "ĠĠ Ġ"]
    assert len(merges) - 1 == 151643 - 256
    assert (tok_dir / "merges.txt").stat().st_size == 1_671_853
    assert (tok_dir / "vocab.json").stat().st_size == 2_776_833
    assert (tok_dir / "added_tokens.json").stat().st_size == 579


# ----------------------------------------------------------------------------------------------- ids


def test_known_ids(tok):
    assert tok.encode("user") == [872]
    assert tok.encode("system") == [8948]
    assert tok.encode("assistant") == [77091]
    assert tok.encode("\n") == [198]
    assert tok.encode(" the") == [279]
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好，世界") == [108386, 3837, 99489]
    assert tok.encode("You are a helpful assistant") == [2610, 525, 264, 10950, 17847]


def test_matches_rank_bpe(tok):
    """Independent of HF: the recovered merges reproduce tiktoken-style BPE over the Qwen ranks (merge the
    lowest-ranked adjacent pair first) after NFC and the Qwen2 split regex."""
    import regex
    ranks = tokmod.load_qwen_ranks(str(tokmod.find_qwen_tiktoken()))
    split = regex.compile(tokmod.QWEN2_PRETOKENIZE_REGEX)

    def rank_bpe(piece):
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            scored = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            scored = [s for s in scored if s[0] is not None]
            if not scored:
                break
            _, i = min(scored)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[p] for p in parts]

    for text in TEXTS[:12] + [TEXTS[-1], (tokmod.__doc__ or "") * 2]:
        expected = [i for piece in split.findall(unicodedata.normalize("NFC", text)) for i in rank_bpe(piece.encode())]
        assert tok.encode(text) == expected, text


def test_special_tokens(tok, hf_tok):
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert hf_tok.eos_token_id == 151645 and hf_tok.pad_token_id == 151643
    assert len(tok) == len(hf_tok) == 151665
    for idx, content, special in QWEN2_5_OMNI_ADDED_TOKENS:
        assert tok.token_to_id(content) == idx == hf_tok.convert_tokens_to_ids(content)
        assert tok.id_to_token(idx) == content
        assert tok.encode(content) == [idx]
        assert tok.encode(f"a{content}b") == [64, idx, 65]
        assert (idx in tok.special_token_ids) == special
    # Processor-facing named tokens (transformers' Qwen2_5OmniProcessor reads these off the tokenizer).
    assert (hf_tok.image_token, hf_tok.image_token_id) == ("<|IMAGE|>", 151655)
    assert (hf_tok.audio_token, hf_tok.audio_token_id) == ("<|AUDIO|>", 151646)
    assert (hf_tok.video_token, hf_tok.video_token_id) == ("<|VIDEO|>", 151656)
    assert (hf_tok.vision_bos_token, hf_tok.vision_eos_token) == ("<|vision_bos|>", "<|vision_eos|>")
    assert (hf_tok.audio_bos_token, hf_tok.audio_eos_token) == ("<|audio_bos|>", "<|audio_eos|>")


def test_ids_match_hf(tok, hf_tok):
    texts = _all_texts()
    ours = tok.encode_batch(texts)
    for text, ids in zip(texts, ours):
        assert ids == tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert ids == hf_tok(text)["input_ids"], text


def test_decode_round_trip(tok, hf_tok):
    for text in _all_texts():
        ids = tok.encode(text)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi there"
    # Non-special added tokens survive skip_special_tokens (as in HF).
    assert tok.decode(tok.encode("<tool_call>x"), skip_special_tokens=True) == "<tool_call>x"


def test_vocab_merges_fallback(tok, tok_dir, tmp_path):
    """No tokenizer.json: rebuild from vocab.json + merges.txt + added tokens (config or added_tokens.json)."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, tmp_path / name)
    slow = Tokenizer.from_pretrained(tmp_path)
    texts = _all_texts()
    assert slow.encode_batch(texts) == tok.encode_batch(texts)
    assert slow.added_tokens == tok.added_tokens and slow.special_token_ids == tok.special_token_ids
    assert slow.chat_template == QWEN2_5_OMNI_CHAT_TEMPLATE

    (tmp_path / "tokenizer_config.json").unlink()
    for name in ("added_tokens.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, tmp_path / name)
    legacy = Tokenizer.from_pretrained(tmp_path)
    assert legacy.encode(texts[12]) == tok.encode(texts[12])
    assert legacy.special_token_ids == tok.special_token_ids
    assert legacy.eos_token_id == 151645 and legacy.pad_token_id == 151643


# ----------------------------------------------------------------------------------------------- streaming


def _stream(tok, ids, skip):
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [dec.put(i) for i in ids]
    return pieces, pieces + [dec.finish()]


def test_stream_decoder_matches_decode(tok):
    for text in _all_texts():
        ids = tok.encode(text)
        for skip in (False, True):
            _, pieces = _stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_multibyte_split(tok):
    byte_id = {b: tok.token_to_id(tokmod._bytes_to_unicode()[b]) for b in range(256)}
    # "é" and "你" (3 bytes) as single-byte tokens.
    ids = [byte_id[0xC3], byte_id[0xA9], byte_id[0xE4], byte_id[0xBD], byte_id[0xA0]]
    assert None not in ids
    dec = tok.stream_decoder()
    assert dec.put(ids[0]) == "" and dec.pending_bytes == b"\xc3"
    assert dec.put(ids[1]) == "é"
    assert dec.put(ids[2]) == "" and dec.put(ids[3]) == "" and dec.pending_bytes == b"\xe4\xbd"
    assert dec.put(ids[4]) == "你"
    assert dec.finish() == ""
    assert tok.decode(ids) == "é你"

    # A naturally split character: the ZWJ sequence's U+200D comes out as two tokens.
    ids = tok.encode("👨‍👩")
    pieces, with_flush = _stream(tok, ids, True)
    assert "" in pieces and "".join(with_flush) == "👨‍👩" == tok.decode(ids)

    # Invalid / truncated UTF-8 becomes U+FFFD exactly as decode() does; specials in between.
    for ids in ([byte_id[0xA9], 64], [64, byte_id[0xE4]], [byte_id[0xE4], 151645, byte_id[0xBD], 65],
                [byte_id[0xF0], byte_id[0x9F], 65, byte_id[0xFF]]):
        for skip in (False, True):
            _, pieces = _stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


# ----------------------------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_hf(hf_tok, name):
    conv = CONVERSATIONS[name]
    for kw in ({}, {"add_vision_id": True}, {"add_vision_id": True, "add_audio_id": True}):
        for gen in (True, False):
            ours = render_chat(conv, add_generation_prompt=gen, **kw)
            theirs = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kw)
            assert ours == theirs


def test_chat_template_rendering(tok):
    text = render_chat(CONVERSATIONS["no_system"])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello! Who are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(CONVERSATIONS["mixed_media"], add_vision_id=True, add_audio_id=True).count("Picture 3: ") == 1
    ids = tok.apply_chat_template(CONVERSATIONS["system"])
    assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]
    assert tok.apply_chat_template(CONVERSATIONS["system"], tokenize=False) == render_chat(CONVERSATIONS["system"])


@pytest.mark.parametrize("conv, match", [
    ([{"role": "robot", "content": "hi"}], r"message 0: unknown role 'robot'"),
    ([{"content": "hi"}], r"message 0: missing 'role'"),
    ([{"role": "user"}], r"message 0: missing 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": None}], r"message 1: 'content' must be"),
    ([{"role": "user", "content": [{"type": "gif", "gif": "x"}]}],
     r"message 0, content part 0: unknown part type 'gif'"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"message 0, content part 0: text part has no 'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": 3}]}],
     r"message 0, content part 1: 'text' must be a string"),
    ([{"role": "user", "content": [{"foo": 1}]}], r"message 0, content part 0: cannot tell the part type"),
    ([{"role": "user", "content": ["plain string part"]}], r"message 0, content part 0: a content part must be a dict"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"has no 'image_url' field"),
    ("hello", r"conversation must be a list"),
])
def test_chat_template_errors(conv, match):
    with pytest.raises(ValueError, match=match):
        render_chat(conv)


# ----------------------------------------------------------------------------------------------- missing dashscope


def test_missing_dashscope_message(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("OMNI_JAX_QWEN_TIKTOKEN", raising=False)
    monkeypatch.setattr(tokmod.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(FileNotFoundError, match=r"pip install dashscope"):
        tokmod.find_qwen_tiktoken()
    with pytest.raises(FileNotFoundError, match=r"pip install dashscope"):
        write_qwen_tokenizer("/nonexistent/never-created")


def test_bad_tiktoken_file(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(ValueError, match="151643-token Qwen2 BPE"):
        write_qwen_tokenizer(tmp_path / "out", tiktoken_path=bad)
