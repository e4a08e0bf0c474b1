"""Does a toy-trained model speak the answer's codec pattern? Greedy thinker + greedy talker on validation
questions of omni_toy; the generated codec tokens against `toy_task.codec_pattern(answer)`.

    python bench/talker_demo_check.py --model demo/toy-run/final --data-dir demo/tfds [--num 32]

Prints one JSON line: exact_pattern (codes == pattern of the reference answer, end token right after),
exact_pattern_of_spoken_word (codes == pattern of the word the thinker answered: the talker is right even
where the thinker is wrong), code_accuracy (per position of the 12), text_accuracy, n.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="omni_jax checkpoint dir (WORKDIR/final of a toy run)")
    p.add_argument("--data-dir", default="~/tensorflow_datasets", help="TFDS data_dir holding omni_toy")
    p.add_argument("--config", default="default", help="omni_toy builder config")
    p.add_argument("--num", type=int, default=32, help="validation questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--speaker", default="Chelsie")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="talker repetition penalty (1.0: pure greedy, the training objective's argmax)")
    args = p.parse_args(argv)

    from omni_jax import OmniModel, Processor
    from omni_jax.data.pipeline import DataConfig, make_eval_examples
    from omni_jax.data.toy_task import CODEC_LENGTH, codec_pattern, normalize_answer

    model = OmniModel.from_pretrained(args.model)
    processor = Processor.from_pretrained(args.model)
    examples = make_eval_examples(DataConfig(dataset="omni_toy", data_dir=args.data_dir, config=args.config),
                                  split="validation", limit=args.num)
    talker = {"do_sample": False, "repetition_penalty": args.repetition_penalty, "max_new_tokens": CODEC_LENGTH + 8}
    exact = exact_spoken = text_ok = 0
    code_hits = 0
    rows = []
    for flag in (False, True):
        group = [e for e in examples if bool(e["use_audio_in_video"]) == flag]
        for start in range(0, len(group), args.batch_size):
            chunk = group[start:start + args.batch_size]
            batch = processor([e["conversation"] for e in chunk], use_audio_in_video=flag)
            out = model.generate(batch, max_new_tokens=4, use_audio_in_video=flag, return_audio=True,
                                 speaker=args.speaker, talker=talker)
            for e, text, codes in zip(chunk, out.text, out.codec_tokens):
                codes = np.asarray(codes)
                target = codec_pattern(e["answer"])
                word = normalize_answer(text or "")
                exact += bool(np.array_equal(codes, target))
                exact_spoken += bool(word) and bool(np.array_equal(codes, codec_pattern(word)))
                text_ok += word == normalize_answer(e["answer"])
                code_hits += int(sum(a == b for a, b in zip(codes[:CODEC_LENGTH], target)))
                rows.append({"id": e["id"], "answer": e["answer"], "said": word, "codes": codes.tolist()[:16]})
    n = len(examples)
    result = {"n": n, "exact_pattern": exact / n, "exact_pattern_of_spoken_word": exact_spoken / n,
              "code_accuracy": code_hits / (n * CODEC_LENGTH), "text_accuracy": text_ok / n}
    print(json.dumps(result))
    return {**result, "rows": rows}


if __name__ == "__main__":
    main()
