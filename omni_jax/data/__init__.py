"""Training data: TFDS builders (conversation JSONL, the synthetic omni_toy task) and the grain pipeline
(processing, loss masks, TMRoPE positions, packing into fixed-shape batches). See docs/data.md."""
from omni_jax.data.pipeline import (
    DataConfig,
    build_dataset,
    get_builder,
    load_source,
    make_dataset,
    make_eval_examples,
    make_train_iterator,
)

__all__ = [
    "DataConfig",
    "build_dataset",
    "get_builder",
    "load_source",
    "make_dataset",
    "make_eval_examples",
    "make_train_iterator",
]
