"""The Qwen2.5-Omni chat template, in plain Python.

`render_chat` produces exactly the string that the released template (``chat_template.json`` of
Qwen/Qwen2.5-Omni-7B / -3B, kept verbatim below as `QWEN2_5_OMNI_CHAT_TEMPLATE`) renders through jinja,
for every well-formed conversation:

* if the first message is not ``system``, ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n``
  is inserted first;
* every message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
* list content is rendered part by part: image -> ``<|vision_bos|><|IMAGE|><|vision_eos|>``, audio ->
  ``<|audio_bos|><|AUDIO|><|audio_eos|>``, video -> ``<|vision_bos|><|VIDEO|><|vision_eos|>``, text -> the text,
  with optional ``Picture k: `` / ``Video k: `` (``add_vision_id``) and ``Audio k: `` (``add_audio_id``) prefixes
  counted over the whole conversation;
* the generation prompt is ``<|im_start|>assistant\\n``.

A part is classified the way the template does it: image if ``type == "image"`` or it has an ``image`` or
``image_url`` key, else audio if ``type == "audio"`` or it has an ``audio`` or ``audio_url`` key, else video if
``type == "video"`` or it has a ``video`` key, else text if it has a ``text`` key. Where jinja would silently
drop or stringify bad input (an unknown role or part type, a text part without text, non-string text,
``None`` content), `render_chat` raises ValueError naming the message index and the problem instead.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "SPEECH_SYSTEM_PROMPT",
    "QWEN2_5_OMNI_CHAT_TEMPLATE",
    "ROLES",
    "render_chat",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The system prompt the Qwen team uses for speech output (README / demos of Qwen2.5-Omni). The talker was
# trained with it; other system prompts may give poor or no speech.
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)

ROLES = ("system", "user", "assistant")

IMAGE_PLACEHOLDER = "<|vision_bos|><|IMAGE|><|vision_eos|>"
AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
VIDEO_PLACEHOLDER = "<|vision_bos|><|VIDEO|><|vision_eos|>"

# Verbatim from the release's chat_template.json (identical copies: transformers' Qwen2.5-Omni processor
# test fixture and model cards of Qwen2.5-Omni fine-tunes that ship the file unchanged).
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Part types accepted explicitly. "image_url" / "audio_url" are the OpenAI-style spellings, which the
# template also recognises through their keys.
_PART_TYPES = frozenset({"text", "image", "audio", "video", "image_url", "audio_url"})


def _part_kind(part: Mapping[str, Any], msg_idx: int, part_idx: int) -> str:
    where = f"message {msg_idx}, content part {part_idx}"
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: a content part must be a dict, got {type(part).__name__}")
    ptype = part.get("type")
    if ptype is not None and ptype not in _PART_TYPES:
        raise ValueError(
            f"{where}: unknown part type {ptype!r} (expected one of 'text', 'image', 'audio', 'video')"
        )
    # Same precedence as the jinja template.
    if ptype == "image" or "image" in part or "image_url" in part:
        return "image"
    if ptype == "audio" or "audio" in part or "audio_url" in part:
        return "audio"
    if ptype == "video" or "video" in part:
        return "video"
    if "text" in part:
        if not isinstance(part["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(part['text']).__name__}")
        return "text"
    if ptype == "text":
        raise ValueError(f"{where}: text part has no 'text' field")
    if ptype is not None:  # "image_url"/"audio_url" without the matching key
        raise ValueError(f"{where}: part of type {ptype!r} has no {ptype!r} field")
    raise ValueError(
        f"{where}: cannot tell the part type (no 'type' and none of the keys "
        "'text', 'image', 'image_url', 'audio', 'audio_url', 'video')"
    )


def render_chat(
    conversation: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
    add_audio_id: bool = False,
) -> str:
    """Render a conversation with the Qwen2.5-Omni chat template.

    Args:
      conversation: list of ``{"role": "system"|"user"|"assistant", "content": str | list[part]}`` where a
        part is ``{"type": "text", "text": ...}``, ``{"type": "image", ...}``, ``{"type": "audio", ...}`` or
        ``{"type": "video", ...}`` (the media payload itself is ignored here; each media part becomes one
        placeholder that the processor later expands).
      add_generation_prompt: append ``<|im_start|>assistant\\n``.
      add_vision_id: prefix images / videos with ``Picture k: `` / ``Video k: ``.
      add_audio_id: prefix audios with ``Audio k: ``.

    Returns the prompt string (identical to HF ``apply_chat_template(..., tokenize=False)`` with the released
    template).
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise ValueError(f"conversation must be a list of messages, got {type(conversation).__name__}")
    out: list[str] = []
    n_image = n_audio = n_video = 0
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"message {i}: missing 'role'")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in message:
            raise ValueError(f"message {i}: missing 'content'")
        content = message["content"]
        if i == 0 and role != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        out.append(f"<|im_start|>{role}\n")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            for j, part in enumerate(content):
                kind = _part_kind(part, i, j)
                if kind == "image":
                    n_image += 1
                    if add_vision_id:
                        out.append(f"Picture {n_image}: ")
                    out.append(IMAGE_PLACEHOLDER)
                elif kind == "audio":
                    n_audio += 1
                    if add_audio_id:
                        out.append(f"Audio {n_audio}: ")
                    out.append(AUDIO_PLACEHOLDER)
                elif kind == "video":
                    n_video += 1
                    if add_vision_id:
                        out.append(f"Video {n_video}: ")
                    out.append(VIDEO_PLACEHOLDER)
                else:
                    out.append(part["text"])
        else:
            raise ValueError(
                f"message {i}: 'content' must be a string or a list of parts, got {type(content).__name__}"
            )
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
