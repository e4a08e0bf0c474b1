"""`omni-jax train --config configs/train/toy.yaml --workdir DIR [section.key=value ...]` (also
`python -m train.cli ...`). Running the same command again on DIR resumes from its latest checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="train YAML, e.g. configs/train/toy.yaml")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/, final/")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=50 optim.learning_rate=3e-3")


def run(args) -> int:
    from train.config import TrainConfig
    from train.loop import TrainingDiverged, train

    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    try:
        summary = train(cfg, args.workdir)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.cli", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
