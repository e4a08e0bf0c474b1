"""omni_toy questions as `omni-jax eval` requests, and the score of an eval's answers.

    python -m omni_jax.data.toy_requests write DIR [--split validation] [--num 32] [--seed 0]
        -> DIR/requests.jsonl (eval request format, media files beside it) and DIR/answers.jsonl
    python -m omni_jax.data.toy_requests score DIR/answers.jsonl OUT.jsonl
        -> accuracy overall and per task (answers compared with `toy_task.normalize_answer`), and chance

The questions are the same pure functions of (seed, split, index) as the dataset's (docs/data.md), so a
model trained on `omni_toy` can be checked end to end through the serving path.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from omni_jax.data.toy_task import CHANCE, OVERALL_CHANCE, normalize_answer, toy_example


def write_requests(out_dir: str, split: str = "validation", num: int = 32, seed: int = 0,
                   max_new_tokens: int = 4) -> tuple[str, str]:
    """Write `num` toy questions of `split` as eval requests; returns (requests path, answers path)."""
    os.makedirs(out_dir, exist_ok=True)
    requests_path = os.path.join(out_dir, "requests.jsonl")
    answers_path = os.path.join(out_dir, "answers.jsonl")
    with open(requests_path, "w") as requests, open(answers_path, "w") as answers:
        for index in range(num):
            example = toy_example(index, split=split, seed=seed)
            request_id = example["id"].replace("/", "-")
            names = []
            for k, (name, data) in enumerate(example["media"]):
                stem, ext = os.path.splitext(name)
                file_name = f"{request_id}-{stem}{ext}"
                with open(os.path.join(out_dir, file_name), "wb") as f:
                    f.write(data)
                names.append(file_name)
            user = example["conversation"][0]
            content = []
            for part in user["content"]:
                part = dict(part)
                kind = part["type"]
                if kind != "text" and isinstance(part.get(kind), str) and part[kind].startswith("media:"):
                    part[kind] = names[int(part[kind].split(":", 1)[1])]
                content.append(part)
            request = {"id": request_id, "messages": [{"role": "user", "content": content}],
                       "max_new_tokens": max_new_tokens, "temperature": 0,
                       "use_audio_in_video": bool(example["use_audio_in_video"])}
            requests.write(json.dumps(request) + "\n")
            answers.write(json.dumps({"id": request_id, "task": example["task"], "answer": example["answer"]}) + "\n")
    return requests_path, answers_path


def score(answers_path: str, outputs_path: str) -> dict:
    """Accuracy of an eval output against the answers: overall, per task, and the errors counted apart."""
    answers = {}
    with open(answers_path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                answers[record["id"]] = record
    outputs = {}
    with open(outputs_path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{outputs_path}:{number}: not a JSON line") from None
            outputs[record.get("id")] = record
    correct, total = collections.Counter(), collections.Counter()
    missing, errors = [], []
    for request_id, answer in answers.items():
        record = outputs.get(request_id)
        if record is None:
            missing.append(request_id)
            continue
        if record.get("error"):
            errors.append(request_id)
        task = answer["task"]
        total[task] += 1
        correct[task] += int(normalize_answer(record.get("text") or "") == answer["answer"])
    n = sum(total.values())
    return {"accuracy": sum(correct.values()) / n if n else 0.0, "num": n, "chance": OVERALL_CHANCE,
            "per_task": {t: {"accuracy": correct[t] / total[t], "num": total[t], "chance": CHANCE[t]}
                         for t in sorted(total)},
            "missing": missing, "errors": errors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_jax.data.toy_requests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("write")
    p.add_argument("out_dir")
    p.add_argument("--split", default="validation")
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p = sub.add_parser("score")
    p.add_argument("answers")
    p.add_argument("outputs")
    args = parser.parse_args(argv)
    if args.command == "write":
        requests, answers = write_requests(args.out_dir, args.split, args.num, args.seed, args.max_new_tokens)
        print(f"wrote {args.num} toy questions: {requests} (answers: {answers})")
        return 0
    result = score(args.answers, args.outputs)
    print(f"toy accuracy {result['accuracy']:.3f} over {result['num']} questions (chance {result['chance']:.3f})")
    for task, r in result["per_task"].items():
        print(f"  {task:7s} {r['accuracy']:.3f} of {r['num']} (chance {r['chance']:.3f})")
    if result["missing"] or result["errors"]:
        print(f"  missing answers: {len(result['missing'])}, error records: {len(result['errors'])}")
    return 1 if result["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
