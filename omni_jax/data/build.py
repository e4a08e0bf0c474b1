"""Build a dataset from the command line (prints the split sizes and, for JSONL data, the skip counts).

    python -m omni_jax.data.build omni_toy --data-dir DIR [--config small]
    python -m omni_jax.data.build omni_toy --data-dir DIR --num-train 500 --num-validation 50
    python -m omni_jax.data.build conversation_jsonl --data-dir DIR --config mydata \\
        --jsonl train=data/train.jsonl --jsonl validation=data/val.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging

from omni_jax.data.pipeline import DataConfig, build_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m omni_jax.data.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("omni_toy", "conversation_jsonl"))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--config", default="default")
    parser.add_argument("--jsonl", action="append", default=[], metavar="SPLIT=PATH")
    parser.add_argument("--use-audio-in-video", action="store_true")
    parser.add_argument("--num-train", type=int)
    parser.add_argument("--num-validation", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    splits = {}
    for item in args.jsonl:
        split, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--jsonl expects SPLIT=PATH, got {item!r}")
        splits[split] = path
    cfg = DataConfig(dataset=args.dataset, data_dir=args.data_dir, config=args.config, jsonl=splits or None,
                     use_audio_in_video=args.use_audio_in_video, toy_num_train=args.num_train,
                     toy_num_validation=args.num_validation, toy_seed=args.seed)
    builder = build_dataset(cfg)
    print(f"{builder.name}/{builder.builder_config.name} {builder.version} in {builder.data_dir}")
    for name, split in builder.info.splits.items():
        print(f"  {name}: {split.num_examples} examples")
    report = builder.info.metadata.get("build_report") if builder.info.metadata else None
    if report:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
