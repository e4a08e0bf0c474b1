"""Generation core through the Processor: multimodal batches vs HF generate, batched == one-by-one, mixed
sampling, streaming, bounded compiled shapes, and a 7B-shaped model served with tensor + data parallelism."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import build_thinker
from media import write_image, write_wav
from omni_jax.api import OmniModel
from omni_jax.processing.processor import Processor
from omni_jax.processing.tokenizer import write_qwen_tokenizer

NO_EOS = [151936 + 1]  # an id no row can produce: every row runs to max_new_tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinker")
    hf = build_thinker(seed=3)  # vocab 151936: the real special-token ids exist
    hf.save_pretrained(path)
    write_qwen_tokenizer(path)
    media = tmp_path_factory.mktemp("media")
    write_image(media / "img.png", 56, 84)
    write_wav(media / "clip.wav", 1.2)
    return hf, OmniModel.from_pretrained(str(path)), Processor.from_pretrained(str(path)), media


def _conversations(media):
    user = lambda *parts: [{"role": "user", "content": list(parts)}]  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return [
        user(text("Hi")),
        user({"type": "image", "image": str(media / "img.png")}, text("What is in the picture?")),
        user({"type": "audio", "audio": str(media / "clip.wav")}, text("What is said?")),
        user(text("A much longer question that pads the others on the left, " * 3)),
    ]


def _hf_generate(hf, batch, n):
    tensors = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        out = hf.generate(**tensors, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=151643)
    return out.numpy()[:, batch["input_ids"].shape[1]:]


def test_multimodal_batch_greedy_equals_hf_and_one_by_one(setup):
    hf, ours, processor, media = setup
    conversations = _conversations(media)
    batch = processor(conversations)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 4  # rows of different lengths, left padded
    out = ours.generate(batch, max_new_tokens=10, eos_token_id=NO_EOS)
    np.testing.assert_array_equal(np.stack(out.generated), _hf_generate(hf, batch, 10))
    for row, conversation in enumerate(conversations):
        alone = ours.generate(processor([conversation]), max_new_tokens=10, eos_token_id=NO_EOS)
        np.testing.assert_array_equal(alone.generated[0], out.generated[row], err_msg=f"row {row}")


def test_mixed_greedy_and_sampled_rows(setup):
    _, ours, processor, media = setup
    batch = processor(_conversations(media)[:1] * 2 + _conversations(media)[3:] * 2)
    kw = dict(max_new_tokens=12, eos_token_id=NO_EOS, temperature=[0.0, 1.0, 0.0, 0.7], top_k=[0, 40, 0, 0],
              top_p=[1.0, 0.95, 1.0, 0.8])
    a = ours.generate(batch, seed=4, **kw)
    streamed = []
    b = ours.generate(batch, seed=4, chunk_steps=5, on_tokens=lambda step, t: streamed.append(t.copy()), **kw)
    c = ours.generate(batch, seed=5, **kw)
    greedy = ours.generate(batch, max_new_tokens=12, eos_token_id=NO_EOS)
    np.testing.assert_array_equal(a.sequences, b.sequences)  # reproducible under a seed, chunked or not
    np.testing.assert_array_equal(streamed[-1], np.stack(b.generated))  # streamed tokens == final tokens
    assert [s.shape[1] for s in streamed] == [1, 6, 11, 12]
    for row in (0, 2):  # greedy rows are unaffected by the sampled rows beside them
        np.testing.assert_array_equal(a.generated[row], greedy.generated[row])
    assert not np.array_equal(a.generated[1], c.generated[1]) or not np.array_equal(a.generated[3], c.generated[3])
    assert not np.array_equal(a.generated[1], greedy.generated[1])


def test_prompt_buckets_bound_the_compiled_shapes(setup):
    _, ours, _, _ = setup
    rng = np.random.default_rng(0)
    before = ours.num_compiled_shapes
    for length in (3, 9, 17, 30, 32):  # one bucket (32)
        ids = rng.integers(100, 5000, (2, length))
        ours.generate({"input_ids": ids, "attention_mask": np.ones_like(ids)}, max_new_tokens=5, eos_token_id=NO_EOS)
    assert ours.num_compiled_shapes == before + 1
    prefill_fn, decode_fn = ours._generate_fns[(5, tuple(NO_EOS), 151643, False, False)]
    assert prefill_fn._cache_size() == 1  # jax compiled the prefill once for the five prompt lengths
    ids = rng.integers(100, 5000, (2, 33))  # the next bucket (64): one more shape
    ours.generate({"input_ids": ids, "attention_mask": np.ones_like(ids)}, max_new_tokens=5, eos_token_id=NO_EOS)
    assert ours.num_compiled_shapes == before + 2 and prefill_fn._cache_size() == 2


# Qwen2.5-Omni-7B thinker: hidden 3584, 28 layers, 28 heads, 4 KV heads (7:1), head_dim 128, ffn 18944
# (5.29 x hidden), mrope_section [16, 24, 24] (2:3:3 of head_dim / 2), biased q/k/v. Scaled down keeping the
# head counts, the ratios and the layer structure: head_dim 16, hidden 28 x 16, ffn 2368, 4 layers.
SEVEN_B_SHAPED = dict(hidden=448, layers=4, heads=28, kv_heads=4, head_dim=16, ffn=2368, mrope_section=(2, 3, 3),
                      vocab=1000)


def test_7b_shaped_tensor_and_data_parallel_equals_single_device(tmp_path_factory):
    assert jax.device_count() == 8
    hf = build_thinker(seed=1, **SEVEN_B_SHAPED)
    path = tmp_path_factory.mktemp("seven_b_shaped")
    hf.save_pretrained(path)
    single = OmniModel.from_pretrained(str(path))
    sharded = OmniModel.from_pretrained(str(path), mesh_shape={"data": 2, "tensor": 4})  # 2 replicas x 4-way TP
    specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(sharded.params)}
    assert any("tensor" in s for s in specs), specs
    rng = np.random.default_rng(2)
    lengths = (13, 5, 9, 11)
    ids = np.zeros((4, 13), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 13 - n:] = rng.integers(1, 1000, n)
        mask[row, 13 - n:] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    kw = dict(max_new_tokens=10, eos_token_id=[1001], pad_token_id=0)
    a = sharded.generate(batch, **kw)
    b = single.generate(batch, **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.stack(a.generated), ref.numpy()[:, 13:])


def test_bfloat16_single_row_runs_as_two_rows_with_the_same_tokens(setup):
    """The XLA:CPU bf16 GEMV workaround (models.layers._needs_second_row: a one-row bf16 projection runs with a
    zero second row): a one-row batch gives the tokens that row gets when it shares a batch with another prompt
    (rows are independent)."""
    from omni_jax.models.layers import _needs_second_row

    hf, _, processor, media = setup
    import tempfile

    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = OmniModel.from_pretrained(path, dtype="bfloat16")
    conversations = _conversations(media)
    one = processor(conversations[:1])
    assert _needs_second_row("btd,df->btf", jnp.zeros((1, 1, 8), jnp.bfloat16)) == (jax.default_backend() == "cpu")
    assert not _needs_second_row("btd,df->btf", jnp.zeros((2, 1, 8), jnp.bfloat16))
    assert not _needs_second_row("btd,df->btf", jnp.zeros((1, 1, 8), jnp.float32))
    streamed = []
    alone = ours.generate(one, max_new_tokens=8, eos_token_id=NO_EOS, chunk_steps=4,
                          on_tokens=lambda step, t: streamed.append(t))
    pair = ours.generate(processor([conversations[0], conversations[3]]), max_new_tokens=8, eos_token_id=NO_EOS)
    assert alone.sequences.shape[0] == 1 and streamed[-1].shape == (1, 8)
    np.testing.assert_array_equal(alone.generated[0], pair.generated[0])
