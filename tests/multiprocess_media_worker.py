"""One process of tests/test_multiprocess_media.py: builds its own rows (toy samples with media), turns them
into the step's global batch with train.batches.device_batch, and (process 0) saves the whole global batch.

    python tests/multiprocess_media_worker.py TOKENIZER_DIR OUT.npz   (JAX_* distributed env set by the test)
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.data.packing import collate
from omni_jax.data.records import make_record
from omni_jax.data.sample import process_record, rope_ids_for
from omni_jax.data.toy_task import toy_example
from omni_jax.processing.processor import Processor
from omni_jax.sharding import make_mesh, maybe_initialize_distributed
from train.batches import device_batch

SEQ_LEN = 320
BUCKETS = {"audio_chunks": 8, "image_patches": 64, "video_patches": 256}
ROWS = [[0, 1], [2, 3]]  # process -> toy example indices (colour+beeps | motion (video+audio)+sum)


def samples(processor, indices):
    out = []
    for i in indices:
        ex = toy_example(i, "train")
        record = make_record(ex["id"], ex["conversation"], ex["media"], use_audio_in_video=ex["use_audio_in_video"],
                             task=ex["task"], answer=ex["answer"], codec=ex["codec"])
        # as the data source reads it back: media as a dict of sequences
        record["media"] = {"name": [m["name"] for m in record["media"]], "data": [m["data"] for m in record["media"]]}
        out.append(process_record(record, processor, rope_ids_for(processor)))
    return out


def pipeline_batch(processor, indices):
    return collate([[s] for s in samples(processor, indices)], seq_len=SEQ_LEN)


def flat(tree) -> dict:
    """{key path: leaf} of a batch pytree (jax.Array or numpy leaves, as they are)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def main() -> None:
    maybe_initialize_distributed()
    processor = Processor.from_pretrained(sys.argv[1])
    config = OmniConfig.from_yaml("configs/models/tiny.yaml")
    batch = pipeline_batch(processor, ROWS[jax.process_index()])
    mesh = make_mesh({"data": -1})
    global_batch = device_batch([batch], config.thinker, mesh, BUCKETS)
    from jax.experimental import multihost_utils

    gathered = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in flat(global_batch).items()}
    if jax.process_index() == 0:
        np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in gathered.items()})


if __name__ == "__main__":
    main()
