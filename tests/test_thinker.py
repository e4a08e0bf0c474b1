"""Thinker LM parity with HF transformers (float32): logits, cached decode, greedy generation, sharding."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from hf_models import build_thinker, left_padded_batch
from omni_jax.api import OmniModel

# Absolute tolerance on float32 logits of O(1-10) magnitude (see hf_models.randomize_): both sides compute in
# float32; the remaining differences are summation order in matmuls and softmax (~1e-6 relative).
LOGITS_ATOL = 1e-4

SHAPES = {
    # name: config overrides (hidden 64 unless given)
    "gqa_4q_2kv": dict(heads=4, kv_heads=2),
    "head_dim_24_not_hidden_over_heads": dict(heads=8, kv_heads=2, head_dim=24, mrope_section=(4, 4, 4)),
    "mha_4q_4kv": dict(heads=4, kv_heads=4, layers=3),
    "mqa_6q_1kv": dict(hidden=48, heads=6, kv_heads=1, ffn=80, mrope_section=(1, 1, 2)),
}
VOCAB = 1000


def _save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def hf_and_ours(request, tmp_path_factory):
    hf = build_thinker(vocab=VOCAB, **SHAPES[request.param])
    path = _save(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, OmniModel.from_pretrained(path)


def _hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("lengths", [(13, 9), (7, 7, 3)])
def test_logits_match_hf_with_left_padding(hf_and_ours, lengths):
    name, hf, ours = hf_and_ours
    ids, mask = left_padded_batch(np.random.default_rng(len(lengths)), lengths, VOCAB)
    ref = _hf_logits(hf, ids, mask)
    got = ours.thinker_logits({"input_ids": ids, "attention_mask": mask})
    valid = mask.astype(bool)
    assert got.shape == ref.shape
    err = np.abs(got - ref)[valid].max()
    assert err < LOGITS_ATOL, f"{name}: max |logits - HF| = {err}"
    assert np.abs(ref[valid]).max() > 1.0  # the comparison is not between near-zero numbers


def test_left_padding_does_not_change_a_row(hf_and_ours):
    _, _, ours = hf_and_ours
    ids, mask = left_padded_batch(np.random.default_rng(3), (12, 5), VOCAB)
    batched = ours.thinker_logits({"input_ids": ids, "attention_mask": mask})
    alone = ours.thinker_logits({"input_ids": ids[1:, -5:], "attention_mask": mask[1:, -5:]})
    np.testing.assert_allclose(batched[1, -5:], alone[0], atol=1e-5)


def test_greedy_16_tokens_identical_to_hf(hf_and_ours):
    name, hf, ours = hf_and_ours
    ids, mask = left_padded_batch(np.random.default_rng(7), (10, 6), VOCAB)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_new = ref.numpy()[:, ids.shape[1]:]
    out = ours.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=16, eos_token_id=[VOCAB + 1],
                        pad_token_id=0)
    assert ref_new.shape == (2, 16)
    np.testing.assert_array_equal(np.stack(out.generated), ref_new, err_msg=name)


def test_streamed_chunks_equal_one_shot(hf_and_ours):
    _, _, ours = hf_and_ours
    ids, mask = left_padded_batch(np.random.default_rng(8), (9, 4), VOCAB)
    seen = []
    out = ours.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=12, eos_token_id=[VOCAB + 1],
                        chunk_steps=5, on_tokens=lambda step, toks: seen.append(toks.copy()))
    one = ours.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=12, eos_token_id=[VOCAB + 1])
    assert [s.shape[1] for s in seen] == [1, 6, 11, 12]
    np.testing.assert_array_equal(seen[-1], np.stack(one.generated))
    np.testing.assert_array_equal(np.stack(out.generated), np.stack(one.generated))


def test_generation_stops_at_end_token(hf_and_ours):
    _, _, ours = hf_and_ours
    ids, mask = left_padded_batch(np.random.default_rng(9), (8, 8), VOCAB)
    free = ours.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=10, eos_token_id=[VOCAB + 1])
    stop = int(free.generated[0][3])  # make row 0's 4th token an end token
    out = ours.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=10, eos_token_id=[stop])
    first = int(np.nonzero(free.generated[0] == stop)[0][0])
    np.testing.assert_array_equal(out.generated[0], free.generated[0][: first + 1])
    assert (out.sequences[0, ids.shape[1] + first + 1:] == ours._pad_id(None)).all()


def test_prompt_longer_than_context_is_an_error(hf_and_ours):
    _, _, ours = hf_and_ours
    ids = np.ones((1, 8), np.int64)
    limit = ours.config.thinker.text.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the context"):
        ours.generate({"input_ids": ids}, max_new_tokens=limit)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}])
def test_sharded_equals_single_device(tmp_path_factory, mesh_shape):
    assert jax.device_count() == 8
    hf = build_thinker(vocab=VOCAB, heads=8, kv_heads=4, head_dim=8, mrope_section=(2, 1, 1))
    path = _save(hf, tmp_path_factory.mktemp("shard"))
    single = OmniModel.from_pretrained(path)
    sharded = OmniModel.from_pretrained(path, mesh_shape=mesh_shape)
    # the weights really are distributed
    specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(sharded.params)}
    assert any("tensor" in s or "fsdp" in s for s in specs)
    ids, mask = left_padded_batch(np.random.default_rng(1), (11, 6, 9, 4, 11, 2, 7, 5), VOCAB)
    batch = {"input_ids": ids, "attention_mask": mask}
    # Sharded matmuls sum in a different order (partial sums per shard + all-reduce): ~1e-6 relative.
    np.testing.assert_allclose(sharded.thinker_logits(batch), single.thinker_logits(batch), atol=2e-5)
    a = sharded.generate(batch, max_new_tokens=8, eos_token_id=[VOCAB + 1])
    b = single.generate(batch, max_new_tokens=8, eos_token_id=[VOCAB + 1])
    np.testing.assert_array_equal(a.sequences, b.sequences)


def test_greedy_with_repetition_penalty_matches_hf(hf_and_ours):
    name, hf, ours = hf_and_ours
    ids, mask = left_padded_batch(np.random.default_rng(11), (9, 5), VOCAB)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                          do_sample=False, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    out = ours.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=12, eos_token_id=[VOCAB + 1],
                        repetition_penalty=1.3)
    np.testing.assert_array_equal(np.stack(out.generated), ref.numpy()[:, ids.shape[1]:], err_msg=name)


def test_sampling_is_reproducible_under_a_seed(hf_and_ours):
    _, _, ours = hf_and_ours
    ids, mask = left_padded_batch(np.random.default_rng(12), (9, 5), VOCAB)
    batch = {"input_ids": ids, "attention_mask": mask}
    kw = dict(max_new_tokens=10, eos_token_id=[VOCAB + 1], temperature=1.0, top_k=50, top_p=0.9)
    a = ours.generate(batch, seed=1, **kw)
    b = ours.generate(batch, seed=1, chunk_steps=3, **kw)  # chunked decoding draws the same tokens
    c = ours.generate(batch, seed=2, **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.sequences, c.sequences)


def test_converted_checkpoint_and_export_give_identical_logits(hf_and_ours, tmp_path):
    """HF dir -> omni-jax convert -> OmniModel equals loading the HF dir; export -> transformers equals the
    original HF model."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from convert.hf_to_orbax import convert
    from convert.orbax_to_hf import export

    name, hf, ours = hf_and_ours
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    convert(str(hf_dir), str(tmp_path / "ckpt"))
    converted = OmniModel.from_pretrained(str(tmp_path / "ckpt"))
    ids, mask = left_padded_batch(np.random.default_rng(5), (8, 6), VOCAB)
    batch = {"input_ids": ids, "attention_mask": mask}
    np.testing.assert_array_equal(converted.thinker_logits(batch), ours.thinker_logits(batch))
    export(str(tmp_path / "ckpt"), str(tmp_path / "exported"))
    back = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tmp_path / "exported")).eval()
    np.testing.assert_array_equal(_hf_logits(back, ids, mask), _hf_logits(hf, ids, mask))
