"""Qwen2 byte-level BPE tokenizer for Qwen2.5-Omni (a thin wrapper around HF `tokenizers`).

Two entry points:

* `Tokenizer.from_pretrained(dir)` loads a checkpoint's tokenizer files: ``tokenizer.json`` when present,
  else ``vocab.json`` + ``merges.txt`` (rebuilt with the Qwen2 pipeline: NFC normaliser, Qwen2 split regex,
  byte-level BPE), plus the added tokens of ``tokenizer_config.json`` (``added_tokens_decoder``) or
  ``added_tokens.json``.
* `write_qwen_tokenizer(out_dir)` writes a complete Qwen2.5-Omni tokenizer directory (``tokenizer.json``,
  ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``, ``special_tokens_map.json``, ``added_tokens.json``)
  from the Qwen BPE ranks file that the PyPI package ``dashscope`` ships (``dashscope/resources/qwen.tiktoken``,
  151,643 tokens). No model hub needed; the result loads in HF transformers (``AutoTokenizer``) and gives the
  real Qwen2 ids.

Merges are recovered from the ranks the way the original BPE would have produced them: for each token
(in rank order) BPE is run on its bytes using only lower-ranked merges until two parts remain; those two
parts are its merge. This gives exactly one merge per non-byte token (151,387) and a ``merges.txt`` of the
same size (1,671,853 bytes) and first lines as the published Qwen2 file.
"""
from __future__ import annotations

import base64
import codecs
import functools
import importlib.metadata
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from omni_jax.processing.chat_template import QWEN2_5_OMNI_CHAT_TEMPLATE, render_chat

__all__ = [
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN2_5_OMNI_ADDED_TOKENS",
    "ENDOFTEXT_ID",
    "IM_START_ID",
    "IM_END_ID",
    "AUDIO_TOKEN_ID",
    "AUDIO_BOS_ID",
    "AUDIO_EOS_ID",
    "VISION_BOS_ID",
    "VISION_EOS_ID",
    "VISION_PAD_ID",
    "IMAGE_TOKEN_ID",
    "VIDEO_TOKEN_ID",
    "StreamDecoder",
    "Tokenizer",
    "find_qwen_tiktoken",
    "load_qwen_ranks",
    "write_qwen_tokenizer",
]

# Qwen2's pre-tokenizer split (note `\p{N}`: single digits, unlike cl100k's `\p{N}{1,3}`).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_TOKENS = 151643  # ranks 0..151642 in qwen.tiktoken

# (id, content, special) of the released Qwen2.5-Omni added_tokens.json / tokenizer_config.json.
# 151646-151648, 151652-151656 are the Omni renames of Qwen2-VL's object_ref/box/vision/image/video tokens.
# The talker's tts_text_pad/start/end ids (151859-151861) have no names in the release and are not listed.
QWEN2_5_OMNI_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|AUDIO|>", True),
    (151647, "<|audio_bos|>", True),
    (151648, "<|audio_eos|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_bos|>", True),
    (151653, "<|vision_eos|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|IMAGE|>", True),
    (151656, "<|VIDEO|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
AUDIO_TOKEN_ID = 151646
AUDIO_BOS_ID = 151647
AUDIO_EOS_ID = 151648
VISION_BOS_ID = 151652
VISION_EOS_ID = 151653
VISION_PAD_ID = 151654
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656

DEFAULT_EOS_TOKEN = "<|im_end|>"
DEFAULT_PAD_TOKEN = "<|endoftext|>"

# Named multimodal tokens; transformers' Qwen2_5OmniProcessor reads them as tokenizer attributes.
_OMNI_NAMED_TOKENS = {
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

_BYTE_LEVEL = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}


# ---------------------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode map


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + k)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


def _bytes_to_token_str(data: bytes) -> str:
    table = _bytes_to_unicode()
    return "".join([table[b] for b in data])


def _token_str_to_bytes(token: str) -> bytes:
    """Inverse of the byte-level mapping, as `tokenizers`' ByteLevel decoder does it: a token with a
    character outside the alphabet (an added token) contributes its UTF-8 bytes unchanged."""
    table = _unicode_to_bytes()
    try:
        return bytes([table[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


# ---------------------------------------------------------------------------------------------------------
# Reading tokenizer directories


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config / special_tokens_map: a string, an AddedToken dict or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    return None


def _added_token_entry(idx: int, content: str, *, special: bool, lstrip: bool = False, rstrip: bool = False,
                       single_word: bool = False, normalized: bool = False) -> dict[str, Any]:
    return {
        "id": int(idx),
        "content": content,
        "single_word": bool(single_word),
        "lstrip": bool(lstrip),
        "rstrip": bool(rstrip),
        "normalized": bool(normalized),
        "special": bool(special),
    }


def _collect_added_tokens(path: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Added tokens from tokenizer_config.json's added_tokens_decoder, else added_tokens.json (special if the
    config or special_tokens_map.json names them), sorted by id."""
    entries: dict[int, dict[str, Any]] = {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping) and decoder:
        for idx, tok in decoder.items():
            if isinstance(tok, str):
                tok = {"content": tok, "special": True}
            entries[int(idx)] = _added_token_entry(
                int(idx), tok["content"], special=tok.get("special", True), lstrip=tok.get("lstrip", False),
                rstrip=tok.get("rstrip", False), single_word=tok.get("single_word", False),
                normalized=tok.get("normalized", False),
            )
    elif (path / "added_tokens.json").is_file():
        names: set[str] = set()
        sources = [config]
        if (path / "special_tokens_map.json").is_file():
            sources.append(_read_json(path / "special_tokens_map.json"))
        for src in sources:
            for key, value in src.items():
                if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, (list, tuple)):
                    names.update(c for c in map(_token_content, value) if c)
                elif key.endswith("_token"):
                    c = _token_content(value)
                    if c:
                        names.add(c)
        for content, idx in _read_json(path / "added_tokens.json").items():
            entries[int(idx)] = _added_token_entry(int(idx), content, special=content in names)
    return [entries[k] for k in sorted(entries)]


def _qwen2_tokenizer_json(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
                          added_tokens: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The tokenizers-library serialisation of a Qwen2 tokenizer (same pipeline as the released tokenizer.json
    and as transformers' Qwen2Tokenizer)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [dict(t) for t in added_tokens],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", **_BYTE_LEVEL},
            ],
        },
        "post_processor": {"type": "ByteLevel", **_BYTE_LEVEL},
        "decoder": {"type": "ByteLevel", **_BYTE_LEVEL},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(vocab),
            "merges": [[a, b] for a, b in merges],
        },
    }


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            line = line.rstrip("\r\n")
            if not line or (lineno == 0 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno + 1}: expected 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _check_added_ids(backend: _HFTokenizer, added: Iterable[Mapping[str, Any]], where: Path) -> None:
    """`tokenizers` assigns added-token ids sequentially and ignores the ids in the JSON, so make sure the
    result is what the files say."""
    for tok in added:
        got = backend.token_to_id(tok["content"])
        if got != tok["id"]:
            raise ValueError(
                f"{where}: added token {tok['content']!r} should have id {tok['id']} but got {got}; the added "
                "token ids must follow the BPE vocabulary without gaps"
            )


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Qwen2 / Qwen2.5-Omni text tokenizer.

    ``encode`` recognises added tokens such as ``<|im_start|>`` written in the text as single tokens and adds
    no BOS/EOS. ``decode`` keeps special tokens unless ``skip_special_tokens=True`` (the HF default).
    """

    def __init__(self, backend: _HFTokenizer, *, eos_token: str | None = DEFAULT_EOS_TOKEN,
                 pad_token: str | None = DEFAULT_PAD_TOKEN, chat_template: str | None = None,
                 model_max_length: int | None = None, name_or_path: str | None = None):
        self._tok = backend
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._added = dict(backend.get_added_tokens_decoder())  # id -> AddedToken
        self._special_ids = frozenset(i for i, t in self._added.items() if t.special)
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_token_id = None if eos_token is None else backend.token_to_id(eos_token)
        self.pad_token_id = None if pad_token is None else backend.token_to_id(pad_token)
        if eos_token is not None and self.eos_token_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        if pad_token is not None and self.pad_token_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self._byte_cache: dict[int, bytes] = {}

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a checkpoint / tokenizer directory (tokenizer.json preferred; else vocab.json +
        merges.txt) plus tokenizer_config.json, added_tokens.json, special_tokens_map.json and a chat
        template (tokenizer_config.json, chat_template.json or chat_template.jinja) where present."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = _read_json(path / "tokenizer_config.json")
        added = _collect_added_tokens(path, config)

        if (path / "tokenizer.json").is_file():
            backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
            present = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
            missing = [t for t in added if present.get(t["id"]) != t["content"]]
            if missing:  # tokenizer.json without (some of) the config's added tokens: rebuild with them
                data = _read_json(path / "tokenizer.json")
                known = {t["content"] for t in data.get("added_tokens", [])}
                data["added_tokens"] = sorted(
                    list(data.get("added_tokens", [])) + [t for t in added if t["content"] not in known],
                    key=lambda t: t["id"],
                )
                backend = _HFTokenizer.from_str(json.dumps(data))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = _read_json(path / "vocab.json")
            merges = _read_merges_txt(path / "merges.txt")
            # vocab.json may already list the added tokens; the BPE model must not (they are matched first).
            added_contents = {t["content"] for t in added}
            vocab = {k: v for k, v in vocab.items() if k not in added_contents}
            backend = _HFTokenizer.from_str(json.dumps(_qwen2_tokenizer_json(vocab, merges, added)))
        else:
            raise FileNotFoundError(
                f"{path}: no tokenizer.json and no vocab.json + merges.txt (to make a Qwen2.5-Omni tokenizer "
                "without a model hub, use omni_jax.processing.tokenizer.write_qwen_tokenizer)"
            )
        _check_added_ids(backend, added, path)

        chat_template = config.get("chat_template")
        if chat_template is None and (path / "chat_template.jinja").is_file():
            chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if chat_template is None and (path / "chat_template.json").is_file():
            chat_template = _read_json(path / "chat_template.json").get("chat_template")

        eos = _token_content(config["eos_token"]) if "eos_token" in config else DEFAULT_EOS_TOKEN
        pad = _token_content(config["pad_token"]) if "pad_token" in config else DEFAULT_PAD_TOKEN
        if eos is not None and backend.token_to_id(eos) is None and "eos_token" not in config:
            eos = None
        if pad is not None and backend.token_to_id(pad) is None and "pad_token" not in config:
            pad = None
        return cls(backend, eos_token=eos, pad_token=pad, chat_template=chat_template,
                   model_max_length=config.get("model_max_length"), name_or_path=str(path))

    # -- basic API ----------------------------------------------------------------------------------------
    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (BPE vocabulary + added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (dropped by ``decode(skip_special_tokens=True)``)."""
        return self._special_ids

    @property
    def added_tokens(self) -> dict[int, str]:
        return {i: t.content for i, t in sorted(self._added.items())}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(int(idx))

    def token_bytes(self, idx: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes one token contributes to the decoded text (b"" for ids outside the vocabulary, and for
        special tokens when ``skip_special_tokens``)."""
        idx = int(idx)
        if skip_special_tokens and idx in self._special_ids:
            return b""
        cached = self._byte_cache.get(idx)
        if cached is None:
            tok = self._tok.id_to_token(idx)
            cached = b"" if tok is None else _token_str_to_bytes(tok)
            self._byte_cache[idx] = cached
        return cached

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, add_vision_id: bool = False,
                            add_audio_id: bool = False) -> list[int] | str:
        """Render with the Qwen2.5-Omni template (`render_chat`) and, by default, encode."""
        text = render_chat(conversation, add_generation_prompt=add_generation_prompt,
                           add_vision_id=add_vision_id, add_audio_id=add_audio_id)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back the newly completed text.

    Works on bytes: each token's bytes go through an incremental UTF-8 decoder, so a character split across
    tokens comes out once its last byte arrives, and invalid bytes become U+FFFD as in `Tokenizer.decode`.
    ``"".join(put(i) for i in ids) + finish() == tokenizer.decode(ids, skip_special_tokens=...)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id, self.skip_special_tokens))

    __call__ = put

    def put_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.put(i) for i in token_ids)

    def finish(self) -> str:
        """Flush: bytes of an unfinished character come out as U+FFFD. The decoder is reset afterwards."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out

    def reset(self) -> None:
        self._decoder.reset()

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of a character that is not complete yet."""
        return self._decoder.getstate()[0]


# ---------------------------------------------------------------------------------------------------------
# Writing a Qwen2.5-Omni tokenizer directory from dashscope's qwen.tiktoken

_TIKTOKEN_REL = "dashscope/resources/qwen.tiktoken"


def find_qwen_tiktoken() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``dashscope`` distribution (dashscope is not imported:
    it pulls in a network SDK). ``$OMNI_JAX_QWEN_TIKTOKEN`` overrides the search."""
    env = os.environ.get("OMNI_JAX_QWEN_TIKTOKEN")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"OMNI_JAX_QWEN_TIKTOKEN={env!r} is not a file")
        return Path(env)
    try:
        dist = importlib.metadata.distribution("dashscope")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidate = Path(str(dist.locate_file(_TIKTOKEN_REL)))
        if candidate.is_file():
            return candidate
    for entry in sys.path:
        candidate = Path(entry or ".") / _TIKTOKEN_REL
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "The Qwen2 BPE vocabulary (dashscope/resources/qwen.tiktoken) was not found. Install the PyPI package "
        "that ships it: `pip install dashscope` (only its data file is used, so `pip install --no-deps "
        "dashscope` is enough), or point OMNI_JAX_QWEN_TIKTOKEN at a copy of qwen.tiktoken."
    )


@functools.lru_cache(maxsize=2)
def load_qwen_ranks(path: str | None = None) -> dict[bytes, int]:
    """Parse a tiktoken ranks file ("base64(token) rank" per line) and check it is the Qwen2 vocabulary."""
    path = str(path) if path is not None else str(find_qwen_tiktoken())
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line: {line[:80]!r}") from e
    if len(ranks) != NUM_BPE_TOKENS or set(ranks.values()) != set(range(NUM_BPE_TOKENS)):
        raise ValueError(
            f"{path}: expected the {NUM_BPE_TOKENS}-token Qwen2 BPE with ranks 0..{NUM_BPE_TOKENS - 1}, "
            f"got {len(ranks)} tokens"
        )
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: not a byte-level BPE (some single bytes are missing)")
    return ranks


def _recover_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: BPE the token's bytes with strictly lower-ranked
    merges until two parts remain."""
    get = ranks.get
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        n = len(token)
        if n == 1:
            continue
        if n == 2:
            merges.append((token[:1], token[1:]))
            continue
        parts = [token[i:i + 1] for i in range(n)]
        while len(parts) > 2:
            best_rank = rank
            best_i = -1
            for i in range(len(parts) - 1):
                r = get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best_rank = r
                    best_i = i
            if best_i < 0:
                raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        left, right = parts
        if get(left, rank) >= rank or get(right, rank) >= rank:
            raise ValueError(f"token {token!r} (rank {rank}): recovered merge uses a token of higher rank")
        merges.append((left, right))
    return merges


@functools.lru_cache(maxsize=2)
def _qwen_vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks = load_qwen_ranks(path)
    vocab = {_bytes_to_token_str(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [(_bytes_to_token_str(a), _bytes_to_token_str(b)) for a, b in _recover_merges(ranks)]
    return vocab, merges


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def write_qwen_tokenizer(out_dir: str | os.PathLike, tiktoken_path: str | os.PathLike | None = None,
                         model_max_length: int = 32768) -> Path:
    """Write a complete Qwen2.5-Omni tokenizer directory built from dashscope's ``qwen.tiktoken``.

    Files: ``tokenizer.json``, ``tokenizer_config.json`` (``added_tokens_decoder``, chat template, eos
    ``<|im_end|>``, pad ``<|endoftext|>``, ``tokenizer_class: Qwen2Tokenizer``), ``vocab.json``, ``merges.txt``,
    ``special_tokens_map.json`` and ``added_tokens.json``. Loads with `Tokenizer.from_pretrained` and with HF
    ``AutoTokenizer.from_pretrained`` (identical ids). Takes about a second.

    Args:
      out_dir: directory to create / overwrite the files in.
      tiktoken_path: a ``qwen.tiktoken`` to use instead of the one in the installed ``dashscope``.
      model_max_length: written to tokenizer_config.json (the release says 32768).
    Returns the output directory.
    """
    src = str(tiktoken_path) if tiktoken_path is not None else str(find_qwen_tiktoken())
    vocab, merges = _qwen_vocab_and_merges(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    added = [_added_token_entry(i, c, special=s) for i, c, s in QWEN2_5_OMNI_ADDED_TOKENS]
    special_names = [c for _, c, s in QWEN2_5_OMNI_ADDED_TOKENS if s and c != DEFAULT_PAD_TOKEN]

    _atomic_write_text(out / "tokenizer.json",
                       json.dumps(_qwen2_tokenizer_json(vocab, merges, added), ensure_ascii=False))
    _atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    _atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _atomic_write_text(
        out / "added_tokens.json",
        json.dumps({c: i for i, c, _ in QWEN2_5_OMNI_ADDED_TOKENS}, indent=2, sort_keys=True, ensure_ascii=False)
        + "\n",
    )

    def token_dict(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    special_map = {
        "additional_special_tokens": special_names,
        "eos_token": token_dict(DEFAULT_EOS_TOKEN),
        "pad_token": token_dict(DEFAULT_PAD_TOKEN),
    }
    _atomic_write_text(out / "special_tokens_map.json", json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")

    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added
        },
        "additional_special_tokens": special_names,
        **_OMNI_NAMED_TOKENS,
        "bos_token": None,
        "chat_template": QWEN2_5_OMNI_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": DEFAULT_EOS_TOKEN,
        "errors": "replace",
        "model_max_length": int(model_max_length),
        "pad_token": DEFAULT_PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out
