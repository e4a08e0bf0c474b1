"""The `omni-jax` command line (also `python -m omni_jax`)."""
from __future__ import annotations

import argparse
import logging
import sys


def _cmd_convert(args) -> int:
    from convert.hf_to_orbax import convert

    convert(args.hf_dir, args.out_dir, dtype=args.dtype, thinker_only=args.thinker_only)
    print(f"converted {args.hf_dir} -> {args.out_dir}")
    return 0


def _cmd_export(args) -> int:
    from convert.orbax_to_hf import export

    export(args.ckpt_dir, args.out_dir, dtype=args.dtype)
    print(f"exported {args.ckpt_dir} -> {args.out_dir}")
    return 0


def _cmd_init(args) -> int:
    from omni_jax.init_model import init_random_checkpoint

    init_random_checkpoint(args.config, args.out_dir, seed=args.seed, overrides=args.overrides,
                           write_tokenizer=not args.no_tokenizer)
    print(f"wrote a randomly initialised model ({args.config}) to {args.out_dir}")
    return 0


class _WavStream:
    """A 24 kHz mono float wav written chunk by chunk; flushed after every chunk so the file on disk is a valid
    wav (header included) while generation is still running."""

    def __init__(self, path: str, sample_rate: int):
        import soundfile

        self.file = soundfile.SoundFile(path, "w", samplerate=sample_rate, channels=1, subtype="FLOAT")
        self.frames = 0

    def write(self, chunk) -> None:
        self.file.write(chunk)
        self.file.flush()
        self.frames += len(chunk)

    def close(self) -> None:
        self.file.close()


def _speech_error(path: str, model=None) -> str | None:
    """Why --audio-out cannot work with this model (None if it can)."""
    if model is None:
        from omni_jax.config import OmniConfig

        config = OmniConfig.from_pretrained(path)
        if config.talker is None or config.token2wav is None or not config.enable_audio_output:
            return f"{path} has no talker/token2wav (a thinker-only model); --audio-out needs speech output"
        return None
    if model.speech is None:
        return (f"{path} has no talker/token2wav weights (converted with --thinker-only?); --audio-out needs "
                f"speech output")
    return None


def _cmd_generate(args) -> int:
    from omni_jax.api import OmniModel
    from omni_jax.processing.processor import Processor
    from omni_jax.processing.tokenizer import StreamDecoder
    from omni_jax.speech import SAMPLE_RATE

    if args.stream_audio and not args.audio_out:
        print("error: --stream-audio needs --audio-out FILE.wav", file=sys.stderr)
        return 2
    if args.audio_out and (problem := _speech_error(args.model)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model = OmniModel.from_pretrained(args.model, dtype=args.dtype)
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files (tokenizer.json or vocab.json)", file=sys.stderr)
        return 2
    if args.audio_out:
        if problem := _speech_error(args.model, model):
            print(f"error: {problem}", file=sys.stderr)
            return 2
        from omni_jax.voices import resolve_voice

        try:
            resolve_voice(model.speech.speakers, args.speaker)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    processor = Processor.from_pretrained(args.model)
    content = []
    for kind in ("image", "audio", "video"):
        if getattr(args, kind):
            content.append({"type": kind, kind: getattr(args, kind)})
    content.append({"type": "text", "text": args.prompt})
    conversation = []
    if args.system:
        conversation.append({"role": "system", "content": args.system})
    conversation.append({"role": "user", "content": content})
    batch = processor([conversation], use_audio_in_video=args.use_audio_in_video)

    stream = StreamDecoder(model.tokenizer)
    printed = [0]

    def on_tokens(step, tokens):
        for token in tokens[0, printed[0]:].tolist():
            sys.stdout.write(stream.put(token))
        printed[0] = tokens.shape[1]
        sys.stdout.flush()

    speech = dict(return_audio=bool(args.audio_out), speaker=args.speaker, seed=args.seed)
    wav = _WavStream(args.audio_out, SAMPLE_RATE) if args.stream_audio else None
    try:
        out = model.generate(batch, max_new_tokens=args.max_new_tokens, chunk_steps=args.stream_every,
                             on_tokens=on_tokens, use_audio_in_video=args.use_audio_in_video,
                             talker={"max_new_tokens": args.max_audio_tokens, "do_sample": not args.talker_greedy},
                             **speech,
                             on_audio=(lambda row, chunk: wav.write(chunk)) if wav else None)
    except ValueError as e:  # e.g. a reply too short to speak
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    finally:
        if wav is not None:
            wav.close()
    sys.stdout.write(stream.finish() + "\n")
    if args.audio_out:
        if wav is None:
            import soundfile

            soundfile.write(args.audio_out, out.audio[0], SAMPLE_RATE, subtype="FLOAT")
        seconds = len(out.audio[0]) / SAMPLE_RATE
        print(f"wrote {seconds:.2f} s of speech ({len(out.codec_tokens[0])} codec tokens) to {args.audio_out}",
              file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    from serve.eval import main as eval_main  # lazy: omni_jax does not import serve

    return eval_main(args)


def _cmd_serve(args) -> int:
    import os

    from omni_jax.api import OmniModel
    from omni_jax.processing.processor import Processor
    from serve.continuous import ContinuousEngine  # lazy: omni_jax does not import serve
    from serve.eval import parse_mesh
    from serve.http import serve

    model = OmniModel.from_pretrained(args.model, dtype=args.dtype, mesh_shape=parse_mesh(args.mesh))
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files (tokenizer.json or vocab.json)", file=sys.stderr)
        return 2
    engine = ContinuousEngine(model, Processor.from_pretrained(args.model), max_slots=args.max_slots,
                              page_size=args.page_size, kv_pages=args.kv_pages, max_model_len=args.max_model_len,
                              chunk_size=args.chunk_size, max_audio_tokens=args.max_audio_tokens)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    serve(engine, name, host=args.host, port=args.port, graceful_timeout=args.graceful_timeout)
    return 0


def _cmd_train(args) -> int:
    from train.cli import run  # lazy: the train loop imports Orbax, grain, optax

    return run(args)


def _cmd_compile(args) -> int:
    import os

    # An AOT compile for a TPU slice needs no accelerator here: libtpu describes the slice, and jax itself runs on
    # the CPU (so a laptop works, and on a TPU VM the chips stay free for the run that uses them). Set before jax
    # picks its backends; libtpu's own log lines are kept off the terminal unless --verbose.
    os.environ["JAX_PLATFORMS"] = "cpu"
    if not args.verbose:
        os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
        os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    if "jax" in sys.modules:  # imported already (main() called in-process): backends may still be unset
        import jax

        jax.config.update("jax_platforms", "cpu")
    from omni_jax.tpu_compile.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-jax", description="Qwen2.5-Omni in JAX")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF safetensors dir -> omni_jax (Orbax) checkpoint dir")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16 (default: keep)")
    p.add_argument("--thinker-only", action="store_true",
                   help="convert the thinker only; skip talker/token2wav tensors on purpose")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("export", help="omni_jax checkpoint dir -> HF dir that transformers loads")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default=None)
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("init", help="write a randomly initialised model from a YAML preset (demos, tests)")
    p.add_argument("--config", required=True, help="e.g. configs/models/tiny.yaml")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", action="store_true", help="do not write the Qwen tokenizer files")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(fn=_cmd_init)

    p = sub.add_parser("generate", help="generate a reply to one prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    p.add_argument("--image")
    p.add_argument("--audio")
    p.add_argument("--video")
    p.add_argument("--use-audio-in-video", action="store_true", help="also feed the video's audio track")
    p.add_argument("--speaker", default="Chelsie", help="voice for --audio-out")
    p.add_argument("--audio-out", help="also speak the reply: write a 24 kHz wav here")
    p.add_argument("--stream-audio", action="store_true",
                   help="write --audio-out chunk by chunk as speech is synthesised (a valid wav at every moment)")
    p.add_argument("--max-audio-tokens", type=int, default=4096, help="talker codec tokens at most (50 per s)")
    p.add_argument("--talker-greedy", action="store_true",
                   help="talker picks the most likely codec token (default: the release's sampling)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (talker, flow-matching noise)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stream-every", type=int, default=8, help="decode steps per host round trip")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("eval", help="batch evaluation: requests JSONL in, results JSONL out (resumable)")
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True, help="JSONL, one request per line (docs/eval.md)")
    p.add_argument("--out", required=True, help="JSONL results; ids already in it are skipped")
    p.add_argument("--audio-dir", default=None, help="where wavs are written (default: OUT without .jsonl + _audio)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mesh", default=None, help="shard the model, e.g. data=2,tensor=4")
    p.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize()")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, text and speech)")
    p.add_argument("--model", required=True, help="omni_jax checkpoint dir or HF dir (with tokenizer files)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the dir's name)")
    p.add_argument("--mesh", default=None, help="shard the model, e.g. fsdp=2,tensor=4")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-slots", type=int, default=16, help="decode slots (rows decoded together)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--kv-pages", type=int, default=None,
                   help="pages in the KV cache pool (default: every slot can hold --max-model-len tokens)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + reply (default: the model's)")
    p.add_argument("--chunk-size", type=int, default=512, help="most prompt tokens per prefill step")
    p.add_argument("--max-audio-tokens", type=int, default=None,
                   help="most talker codec tokens of a spoken reply (50 per second; default: the model's 4096)")
    p.add_argument("--graceful-timeout", type=float, default=None,
                   help="seconds to wait for requests in flight at shutdown (default: until they finish)")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("train", help="train or finetune from a train YAML (resumes in an existing workdir)")
    p.add_argument("--config", required=True, help="train YAML, e.g. configs/train/toy.yaml")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/, final/")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=50")
    p.set_defaults(fn=_cmd_train)

    from omni_jax.tpu_compile.command import add_arguments  # argparse only; imports no jax

    p = sub.add_parser("compile", help="AOT-compile a train/prefill/decode program for a TPU slice on any host: "
                                       "per-chip memory, fits, Mosaic kernels, collectives")
    add_arguments(p)
    p.set_defaults(fn=_cmd_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return int(args.fn(args) or 0)
