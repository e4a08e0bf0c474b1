"""TFDS builder `omni_toy`: the synthetic multimodal toy task (toy_task.py), generated locally, no download.

    builder = OmniToy(data_dir=DIR)                          # config "default": 2000 train / 200 validation
    builder = OmniToy(data_dir=DIR, config="small")          # 16 / 8, for tests
    builder = OmniToy(data_dir=DIR, config=OmniToyConfig(name="n100", num_train=100, num_validation=20))
    builder.download_and_prepare()
    source = builder.as_data_source()["train"]               # array_record, random access

Records are the shared record format (records.py) with task, answer and codec filled in.
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from omni_jax.data import records
from omni_jax.data.toy_task import CLASSES, OVERALL_CHANCE, toy_example


@dataclasses.dataclass
class OmniToyConfig(tfds.core.BuilderConfig):
    num_train: int = 2000
    num_validation: int = 200
    seed: int = 0


class OmniToy(tfds.core.GeneratorBasedBuilder):
    """Synthetic colour / beep-count / motion-direction / sum questions with one-word answers."""

    # No download checksums file: TFDS derives one from the code path, which on Python >= 3.9 without the
    # `importlib_resources` backport fails (tensorflow_datasets 4.9.10); these builders download nothing.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "colour, beeps, motion (video with audio track), sum; codec patterns."}
    BUILDER_CONFIGS = [
        OmniToyConfig(name="default", description="2000 train / 200 validation examples"),
        OmniToyConfig(name="small", description="16 train / 8 validation examples (tests)", num_train=16,
                      num_validation=8),
    ]

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(classes={k: list(v) for k, v in CLASSES.items()},
                                          overall_chance=OVERALL_CHANCE)
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=records.features(),
                                     metadata=metadata)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train, cfg.seed),
                "validation": self._generate_examples("validation", cfg.num_validation, cfg.seed)}

    def _generate_examples(self, split: str, count: int, seed: int):
        for index in range(count):
            ex = toy_example(index, split, seed)
            yield ex["id"], records.make_record(ex["id"], ex["conversation"], ex["media"],
                                                use_audio_in_video=ex["use_audio_in_video"], task=ex["task"],
                                                answer=ex["answer"], codec=ex["codec"])
