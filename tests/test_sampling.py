"""Sampling: filtered distributions equal HF's logits processors/warpers; draws reproducible under a key."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omni_jax.sampling import SamplingParams, argmax, categorical, process_logits, seen_mask, select_tokens

V = 300


def _hf(logits, ids, temperature, top_k, top_p, penalty, suppress):
    scores = torch.tensor(logits)
    input_ids = torch.tensor(ids)
    scores = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores)
    scores = SuppressTokensLogitsProcessor(suppress, device="cpu")(input_ids, scores)
    scores = TemperatureLogitsWarper(temperature)(input_ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(input_ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(input_ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (0.9, 40, 0.8, 1.05),  # the talker's released defaults
    (1.0, 0, 0.5, 1.0),
    (0.7, 5, 1.0, 1.3),
    (1.3, 0, 1.0, 1.0),
])
def test_filtered_logits_equal_hf(temperature, top_k, top_p, penalty):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, V)) * 3).astype(np.float32)
    ids = rng.integers(0, V, (3, 20))
    ref = _hf(logits, ids, temperature, top_k, top_p, penalty, [7])
    params = SamplingParams.make(3, temperature, top_k, top_p, penalty)
    got = np.asarray(process_logits(logits, params, seen_mask(ids, V), suppress_tokens=[7]))
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-6)


def test_greedy_rows_use_penalised_argmax_and_rows_are_independent():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, V)).astype(np.float32)
    ids = rng.integers(0, V, (2, 10))
    params = SamplingParams.make(2, temperature=[0.0, 1.0], top_k=[0, 3], repetition_penalty=1.2)
    tokens = np.asarray(select_tokens(logits, params, jax.random.key(0), seen_mask(ids, V)))
    hf = _hf(logits[:1], ids[:1], 1.0, 0, 1.0, 1.2, [])
    assert tokens[0] == int(np.argmax(hf[0]))
    top3 = np.argsort(-_hf(logits[1:], ids[1:], 1.0, 0, 1.0, 1.2, [])[0])[:3]
    assert tokens[1] in top3


def test_sampling_reproducible_under_a_key_and_varies_with_it():
    logits = np.zeros((4, V), np.float32)
    params = SamplingParams.make(4, temperature=1.0)
    a = np.asarray(select_tokens(logits, params, jax.random.key(3)))
    b = np.asarray(select_tokens(logits, params, jax.random.key(3)))
    c = np.asarray(select_tokens(logits, params, jax.random.key(4)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_parameters_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.make(2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.make(2, temperature=[-1.0, 1.0])


@pytest.mark.parametrize("top_k,top_p", [(40, 0.8), (1, 1.0), (255, 1.0), (256, 0.9), (300, 1.0), (0, 0.8),
                                         (0, 0.999999), (0, 1.0), (5, 0.3)])
@pytest.mark.parametrize("scale", [0.3, 3.0])  # flat (top-p needs many tokens) and peaked distributions
def test_windowed_filter_equals_full_sort(top_k, top_p, scale):
    """The lax.top_k window gives the kept set of the full sorts wherever it reports that it fits, and the
    window is used for the released talker settings; logits with heavy ties (rounded) included."""
    from omni_jax.sampling import TOP_WINDOW, _filter_in_window, _filter_sorted

    rng = np.random.default_rng(top_k * 7 + int(top_p * 100))
    for vocab, rounding in ((8448, None), (1000, 0.5)):
        logits = (rng.normal(size=(4, vocab)) * scale).astype(np.float32)
        if rounding:
            logits = np.round(logits / rounding) * rounding  # many exact ties, some across the window edge
        params = SamplingParams.make(4, 1.0, top_k, top_p)
        windowed, fits = _filter_in_window(jax.numpy.asarray(logits), params, TOP_WINDOW)
        full = np.asarray(_filter_sorted(jax.numpy.asarray(logits), params))
        fits = np.asarray(fits)
        np.testing.assert_array_equal(np.isinf(np.asarray(windowed))[fits], np.isinf(full)[fits])
        np.testing.assert_array_equal(np.isinf(np.asarray(process_logits(logits, params))), np.isinf(full))
        if (top_k, top_p) == (40, 0.8) and rounding is None:
            assert fits.all()  # the released talker setting takes the window
        if top_k >= TOP_WINDOW:
            assert not fits.any()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's TopK rewrite")
def test_window_is_a_top_k_not_a_full_sort():
    """The window's top_k stays XLA:CPU's TopK kernel (sort + slice rewritten) in the compiled sampling step.
    When the slice was folded into its readers the whole row was sorted: [8, 8448] 7.9 ms instead of 0.6,
    [8, 151936] 181 ms instead of 2.3 (talker batch 8: ~8 of ~120 ms a step)."""
    params = SamplingParams.make(8, 0.9, 40, 0.8, 1.05)
    logits = jax.numpy.zeros((8, 8448), jax.numpy.float32)
    hlo = jax.jit(lambda x, key: select_tokens(x, params, key)).lower(logits, jax.random.key(0)).compile().as_text()
    # the full-sort fallback (`_filter_sorted`, in its own cond branch) keeps its sorts; top_k must not be one
    window_sorts = [line for line in hlo.splitlines() if " sort(" in line and "/top_k" in line]
    assert "TopK" in hlo
    assert not window_sorts, window_sorts[0][:200]


def test_argmax_equals_torch_argmax_with_ties_infinities_and_nans():
    """First maximal index, as torch.argmax (HF greedy) and jnp.argmax; a NaN row gives its first NaN."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 1000)).astype(np.float32)
    x[1, [10, 500, 999]] = 7.0  # ties: the first wins
    x[2] = -np.inf
    x[3, 400] = np.inf
    x[4, [20, 30]] = np.nan
    x[5] = 0.0
    x[5, 600] = -0.0
    x[6, -1] = 9.0  # at the last index
    x[7] = np.round(x[7])  # many ties at the max
    got = np.asarray(argmax(jax.numpy.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jax.numpy.argmax(jax.numpy.asarray(x), axis=-1)))
    finite_rows = [0, 1, 2, 3, 5, 6, 7, 8]
    np.testing.assert_array_equal(got[finite_rows], torch.argmax(torch.tensor(x[finite_rows]), dim=-1).numpy())
    assert got[4] == 20


def test_categorical_draws_equal_jax_random_categorical():
    logits = jax.numpy.asarray(np.random.default_rng(1).standard_normal((4, 500)) * 3, jax.numpy.float32)
    logits = logits.at[2, 100:].set(-jax.numpy.inf)  # a row with a filtered tail
    for seed in range(20):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(categorical(key, logits)),
                                      np.asarray(jax.random.categorical(key, logits, axis=-1)))
