"""The synthetic omni toy task: small generated media with one-word answers from closed sets.

Four tasks, in turn (example k has task k mod 4), each answer drawn uniformly from its class set:

  colour  56x56 PNG, one circle or square on a noisy dark background   "What colour is the shape?"
          classes red / green / blue / yellow                           chance 1/4
  beeps   1.0 s 16 kHz wav with 1-4 short beeps (random pitch, slots)   "How many beeps are there?"
          classes one / two / three / four                              chance 1/4
  motion  2.0 s 56x56 mp4 (H.264, 4 frames at 2 fps) of a dot moving left or right, with an AAC audio
          track (a tone of random pitch, uninformative); read with use_audio_in_video
          "Which way does the dot move?"  classes left / right          chance 1/2
  sum     text only "What is three plus four?", a, b in 1..4            "What is A plus B?"
          classes two .. eight (7; not uniform: triangular)             chance 1/7 by guessing, 1/4 by
                                                                        always answering "five"
Overall chance (uniform guess within the task's class set): (1/4 + 1/4 + 1/2 + 1/7) / 4 = 0.2857.

Every example is a pure function of (seed, split, index), so the data set is reproducible bit for bit
(the mp4/AAC encoders are deterministic for fixed settings; media bytes are generated in memory).

Codec targets (for a talker): each answer word has a fixed pseudo-random codec pattern of
``CODEC_LENGTH`` ids in [0, 8192) derived from the word (crc32), the same every time the word is spoken.
"""
from __future__ import annotations

import io
import zlib
from fractions import Fraction

import numpy as np

TASKS = ("colour", "beeps", "motion", "sum")
COLOURS = {"red": (215, 40, 40), "green": (40, 175, 60), "blue": (50, 80, 220), "yellow": (225, 205, 40)}
COUNT_WORDS = ("one", "two", "three", "four")
DIRECTIONS = ("left", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
QUESTIONS = {
    "colour": "What colour is the shape? Answer with one word.",
    "beeps": "How many beeps are there? Answer with one word.",
    "motion": "Which way does the dot move? Answer with one word.",
    "sum": "What is {a} plus {b}? Answer with one word.",
}
CLASSES = {
    "colour": tuple(COLOURS),
    "beeps": COUNT_WORDS,
    "motion": DIRECTIONS,
    "sum": NUMBER_WORDS[2:],
}
CHANCE = {task: 1.0 / len(classes) for task, classes in CLASSES.items()}
OVERALL_CHANCE = float(np.mean(list(CHANCE.values())))

IMAGE_SIZE = 56  # one 28x28 merge unit is 2x2 patches of 14: 56x56 -> grid (1, 4, 4) -> 4 LM tokens
VIDEO_PIXELS = IMAGE_SIZE * IMAGE_SIZE  # per-part min/max_pixels keep the video frames at 56x56
SAMPLE_RATE = 16000
BEEP_CLIP_SECONDS = 1.0
VIDEO_SECONDS, VIDEO_FPS = 2.0, 2
CODEC_LENGTH = 12
CODEC_VOCAB = 8192
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def codec_pattern(word: str) -> np.ndarray:
    """The fixed codec-token pattern [CODEC_LENGTH] int32 of an answer word."""
    rng = np.random.default_rng(zlib.crc32(word.encode("utf-8")))
    return rng.integers(0, CODEC_VOCAB, size=CODEC_LENGTH).astype(np.int32)


# ------------------------------------------------------------------------------------------------ media
def colour_png(colour: str, rng: np.random.Generator) -> bytes:
    from PIL import Image

    s = IMAGE_SIZE
    base = rng.integers(15, 60)
    img = np.clip(base + rng.normal(0, 6, (s, s, 3)), 0, 255)
    y, x = np.mgrid[0:s, 0:s]
    size = int(rng.integers(14, 26))
    cy, cx = (int(v) for v in rng.integers(size // 2 + 2, s - size // 2 - 2, size=2))
    if rng.random() < 0.5:
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= (size / 2) ** 2
    else:
        inside = (abs(y - cy) <= size // 2) & (abs(x - cx) <= size // 2)
    rgb = np.asarray(COLOURS[colour], np.float64) + rng.normal(0, 10, 3)
    img[inside] = rgb
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def beeps_wav(count: int, rng: np.random.Generator) -> bytes:
    import soundfile as sf

    n = int(BEEP_CLIP_SECONDS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    wave = 0.01 * rng.standard_normal(n)
    freq = rng.uniform(500, 1500)
    beep = int(0.08 * SAMPLE_RATE)
    ramp = np.minimum(1.0, np.minimum(np.arange(beep), np.arange(beep)[::-1]) / (0.005 * SAMPLE_RATE))
    slots = np.sort(rng.choice(4, size=count, replace=False))  # 4 slots of 0.23 s, one beep each at most
    for slot in slots:
        start = int((0.05 + 0.23 * slot + rng.uniform(0, 0.06)) * SAMPLE_RATE)
        wave[start:start + beep] += 0.5 * ramp * np.sin(2 * np.pi * freq * t[start:start + beep])
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1).astype(np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def motion_mp4(direction: str, rng: np.random.Generator) -> bytes:
    """4 frames at 2 fps of a bright dot moving ``direction``, with a 2 s AAC tone track."""
    import av

    s = IMAGE_SIZE
    n_frames = int(VIDEO_SECONDS * VIDEO_FPS)
    x0, x1 = (10, 46) if direction == "right" else (46, 10)
    xs = np.linspace(x0, x1, n_frames) + rng.uniform(-2, 2)
    cy = rng.uniform(12, s - 12)
    radius = rng.uniform(4, 7)
    y, x = np.mgrid[0:s, 0:s]
    background = rng.integers(10, 50)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        vs = container.add_stream("libx264", rate=Fraction(VIDEO_FPS))
        vs.width = vs.height = s
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": "18", "preset": "ultrafast"}
        astream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for i, cx in enumerate(xs):
            img = np.full((s, s, 3), background, np.float64)
            img[(y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2] = 240
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, VIDEO_FPS)
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        n = int(VIDEO_SECONDS * SAMPLE_RATE)
        tone = (0.3 * np.sin(2 * np.pi * rng.uniform(300, 800) * np.arange(n) / SAMPLE_RATE)).astype(np.float32)
        block = astream.codec_context.frame_size or 1024
        for start in range(0, n, block):
            aframe = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[None, start:start + block]),
                                                format="fltp", layout="mono")
            aframe.sample_rate = SAMPLE_RATE
            aframe.pts, aframe.time_base = start, Fraction(1, SAMPLE_RATE)
            for packet in astream.encode(aframe):
                container.mux(packet)
        for packet in astream.encode(None):
            container.mux(packet)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ examples
def toy_example(index: int, split: str = "train", seed: int = 0) -> dict:
    """Example ``index`` of ``split``: a dict with conversation ("media:K" refs), media [(name, bytes)],
    use_audio_in_video, task, answer, codec."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(_SPLIT_IDS)})")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    task = TASKS[index % len(TASKS)]
    media: list[tuple[str, bytes]] = []
    use_aiv = False
    if task == "colour":
        answer = str(rng.choice(CLASSES["colour"]))
        media.append(("shape.png", colour_png(answer, rng)))
        content = [{"type": "image", "image": "media:0"}, {"type": "text", "text": QUESTIONS[task]}]
    elif task == "beeps":
        count = int(rng.integers(1, 5))
        answer = COUNT_WORDS[count - 1]
        media.append(("beeps.wav", beeps_wav(count, rng)))
        content = [{"type": "audio", "audio": "media:0"}, {"type": "text", "text": QUESTIONS[task]}]
    elif task == "motion":
        answer = str(rng.choice(DIRECTIONS))
        media.append(("dot.mp4", motion_mp4(answer, rng)))
        use_aiv = True
        content = [{"type": "video", "video": "media:0", "min_pixels": VIDEO_PIXELS, "max_pixels": VIDEO_PIXELS},
                   {"type": "text", "text": QUESTIONS[task]}]
    else:
        a, b = (int(v) for v in rng.integers(1, 5, size=2))
        answer = NUMBER_WORDS[a + b]
        content = [{"type": "text", "text": QUESTIONS[task].format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])}]
    conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"id": f"omni_toy/{split}/{index}", "conversation": conversation, "media": media,
            "use_audio_in_video": use_aiv, "task": task, "answer": answer, "codec": codec_pattern(answer)}


def normalize_answer(text: str) -> str:
    """Generated text -> the word compared with the answer (lower case, first word, punctuation stripped)."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:'\"") if words else ""
