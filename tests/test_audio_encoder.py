"""Audio encoder parity with HF transformers' `Qwen2_5OmniAudioEncoder` (float32), chunk plan, shapes, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

from omni_jax.config import AudioEncoderConfig, RuntimeOptions
from omni_jax.models.audio_encoder import (
    AudioEncoder,
    audio_output_lengths,
    gather_audio_tokens,
    plan_audio_chunks,
    sinusoid_table,
)

TINY = dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
            output_dim=48, n_window=100, max_source_positions=1500)
LENGTHS = (37, 200, 431, 1000)  # odd; exactly one chunk; several chunks with remainders
T_PAD = 1100


@pytest.fixture(scope="module")
def hf_encoder():
    config = Qwen2_5OmniAudioEncoderConfig(**TINY)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2_5OmniAudioEncoder(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # O(1) activations: N(0, 1/fan_in) weights, N(0, 0.1) biases, LN weights 1 + N(0, 0.1)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name or "ln_post" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim >= 2 and "audio_bos_eos_token" not in name:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / fan_in**0.5)
            else:
                p.copy_(noise)
    return model


def to_flax_params(model: Qwen2_5OmniAudioEncoder) -> dict:
    """HF state_dict -> our param tree (Linear [out, in] -> [in, out]; Conv1d [out, in, k] -> [k, in, out])."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    cfg = model.config
    D, H = cfg.d_model, cfg.encoder_attention_heads
    hd = D // H

    def layer(i):
        p = f"layers.{i}."
        ln = lambda n: {"scale": sd[p + n + ".weight"], "bias": sd[p + n + ".bias"]}
        heads_in = lambda n: sd[p + f"self_attn.{n}.weight"].T.reshape(D, H, hd)
        return {
            "self_attn_layer_norm": ln("self_attn_layer_norm"),
            "self_attn": {
                "q_proj": {"kernel": heads_in("q_proj"), "bias": sd[p + "self_attn.q_proj.bias"].reshape(H, hd)},
                "k_proj": {"kernel": heads_in("k_proj")},
                "v_proj": {"kernel": heads_in("v_proj"), "bias": sd[p + "self_attn.v_proj.bias"].reshape(H, hd)},
                "out_proj": {"kernel": sd[p + "self_attn.out_proj.weight"].T.reshape(H, hd, D),
                             "bias": sd[p + "self_attn.out_proj.bias"]},
            },
            "final_layer_norm": ln("final_layer_norm"),
            "fc1": {"kernel": sd[p + "fc1.weight"].T, "bias": sd[p + "fc1.bias"]},
            "fc2": {"kernel": sd[p + "fc2.weight"].T, "bias": sd[p + "fc2.bias"]},
        }

    layers = [layer(i) for i in range(cfg.encoder_layers)]
    return {
        "conv1": {"kernel": sd["conv1.weight"].transpose(2, 1, 0), "bias": sd["conv1.bias"]},
        "conv2": {"kernel": sd["conv2.weight"].transpose(2, 1, 0), "bias": sd["conv2.bias"]},
        "layers": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers),
        "ln_post": {"scale": sd["ln_post.weight"], "bias": sd["ln_post.bias"]},
        "proj": {"kernel": sd["proj.weight"].T, "bias": sd["proj.bias"]},
        "audio_bos_eos_token": {"embedding": sd["audio_bos_eos_token.weight"]},
    }


def make_batch(lengths, t_pad=T_PAD, seed=0):
    """Random features; the padded region holds garbage (it must never be read)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(lengths), TINY["num_mel_bins"], t_pad)).astype(np.float32)
    mask = (np.arange(t_pad)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return features, mask


def hf_audio_features(model, features, mask) -> np.ndarray:
    """What `Qwen2_5OmniThinkerModel.get_audio_features` does with a feature_attention_mask."""
    features, mask = torch.from_numpy(features), torch.from_numpy(mask).long()
    lengths = mask.sum(1)
    packed = features.permute(0, 2, 1)[mask.bool()].permute(1, 0)  # [n_mels, ΣF]
    after_cnn, _ = model._get_feat_extract_output_lengths(lengths)
    with torch.no_grad():
        out = model(packed, feature_lens=lengths, aftercnn_lens=after_cnn)
    return out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def ours(hf_encoder):
    config = AudioEncoderConfig(**TINY)
    module = AudioEncoder(config, RuntimeOptions())
    params = {"params": to_flax_params(hf_encoder)}
    return module, params, jax.jit(module.apply)


def run_ours(ours, features, mask, chunk_bucket=None):
    module, params, apply = ours
    plan = plan_audio_chunks(features, mask, chunk_bucket, n_window=TINY["n_window"])
    tokens, token_mask = apply(params, plan.chunks, plan.chunk_lengths)
    return np.asarray(gather_audio_tokens(tokens, token_mask)), plan, (tokens, token_mask)


def test_param_tree_matches_init(hf_encoder, ours):
    module, params, _ = ours
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((2, TINY["num_mel_bins"], 200)),
                               jnp.array([200, 13], jnp.int32))
    unboxed = nn.meta.unbox(variables)
    expected = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), unboxed)
    got = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), params)
    assert got == expected
    # every parameter carries logical axis names, one per dim; stacked layers lead with "layers"
    boxes = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) and len(b.names) == b.value.ndim for b in boxes)
    layer_boxes = jax.tree_util.tree_leaves(variables["params"]["layers"],
                                            is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(b.names[0] == "layers" for b in layer_boxes)


def test_sinusoid_table_matches_hf(hf_encoder):
    table = hf_encoder.positional_embedding.positional_embedding.numpy()
    # torch's vectorised float32 sin/cos are within 1 ulp, not correctly rounded; ours are correctly rounded
    np.testing.assert_allclose(sinusoid_table(table.shape[0], table.shape[1]), table, atol=1.2e-7, rtol=0)


def test_batch_parity(hf_encoder, ours):
    features, mask = make_batch(LENGTHS)
    expected = hf_audio_features(hf_encoder, features, mask)
    got, plan, _ = run_ours(ours, features, mask)
    assert plan.chunk_lengths.tolist() == [37, 200, 200, 200, 31, 200, 200, 200, 200, 200]
    assert plan.chunk_sample.tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    assert got.shape == expected.shape == (plan.num_tokens, TINY["output_dim"])
    assert np.abs(expected).mean() > 0.3  # O(1) activations, so an absolute tolerance means something
    err = np.abs(got - expected).max()
    print(f"batch max abs err {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("length", [1, 2, 3, 5, 401])
def test_single_clip_parity(hf_encoder, ours, length):
    features, mask = make_batch([length], t_pad=500, seed=length)
    expected = hf_audio_features(hf_encoder, features, mask)
    got, plan, _ = run_ours(ours, features, mask)
    assert got.shape == expected.shape
    if expected.size:
        err = np.abs(got - expected).max()
        print(f"single clip {length} max abs err {err:.2e}")
        assert err < 1e-4


def test_padding_chunks_do_not_change_output(ours):
    features, mask = make_batch(LENGTHS)
    base, plan, _ = run_ours(ours, features, mask)
    padded, padded_plan, (tokens, token_mask) = run_ours(ours, features, mask, chunk_bucket=8)
    assert padded_plan.num_chunks == 16 and plan.num_chunks == 10
    assert padded_plan.chunk_lengths[10:].tolist() == [0] * 6
    assert padded_plan.chunk_sample[10:].tolist() == [-1] * 6
    assert not np.asarray(token_mask)[10:].any()
    assert np.isfinite(np.asarray(tokens)).all()
    np.testing.assert_allclose(padded, base, atol=1e-6, rtol=0)
    # the jit-safe fixed-size gather pads with zero rows
    fixed = jax.jit(gather_audio_tokens, static_argnums=2)(tokens, token_mask, plan.num_tokens + 3)
    np.testing.assert_array_equal(np.asarray(fixed[: plan.num_tokens]), padded)
    assert not np.asarray(fixed[plan.num_tokens:]).any()


def test_token_counts(hf_encoder):
    lengths = np.array([1, 2, 3, 4, 37, 199, 200, 201, 230, 431, 1000, 30000])
    mask = (np.arange(30000)[None, :] < lengths[:, None]).astype(np.int32)
    features = np.zeros((len(lengths), TINY["num_mel_bins"], 30000), np.float32)
    plan = plan_audio_chunks(features, mask, n_window=TINY["n_window"])
    f1 = (lengths - 1) // 2 + 1
    formula = (f1 - 2) // 2 + 1  # spec §3.2.7
    _, hf_tokens = hf_encoder._get_feat_extract_output_lengths(torch.from_numpy(lengths))
    assert plan.tokens_per_sample.tolist() == formula.tolist() == hf_tokens.tolist()
    assert audio_output_lengths(lengths)[1].tolist() == formula.tolist()
    assert formula[lengths.tolist().index(230)] == 57  # 2.3 s -> 57 tokens (spec example)
    # the module's valid-token mask agrees, chunk by chunk summed per sample
    valid_post_conv = (plan.chunk_lengths - 1) // 2 + 1
    per_sample = np.bincount(plan.chunk_sample, weights=valid_post_conv // 2, minlength=len(lengths))
    assert per_sample.astype(int).tolist() == formula.tolist()


def test_zero_length_audio_raises():
    features, mask = make_batch([37, 0, 5], t_pad=64)
    with pytest.raises(ValueError, match="audio sample 1 has no valid frames"):
        plan_audio_chunks(features, mask)


def test_bad_inputs_raise():
    features, mask = make_batch([10], t_pad=64)
    with pytest.raises(ValueError, match="feature_attention_mask has shape"):
        plan_audio_chunks(features, mask[:, :10])
    with pytest.raises(ValueError, match="n_window"):
        plan_audio_chunks(features, mask, n_window=25)


def test_bfloat16_runs_close(ours):
    module, params, _ = ours
    features, mask = make_batch(LENGTHS[:2])
    plan = plan_audio_chunks(features, mask, n_window=TINY["n_window"])
    ref, _ = module.apply(params, plan.chunks, plan.chunk_lengths)
    bf16 = AudioEncoder(module.config, RuntimeOptions(dtype="bfloat16", param_dtype="bfloat16"))
    params16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out, token_mask = jax.jit(bf16.apply)(params16, plan.chunks, plan.chunk_lengths)
    assert out.dtype == jnp.bfloat16
    m = np.asarray(token_mask)
    diff = np.abs(np.asarray(out, np.float32)[m] - np.asarray(ref)[m])
    assert diff.mean() < 0.05 * np.abs(np.asarray(ref)[m]).mean()


def test_remat_gives_same_output_and_grad(ours):
    module, params, _ = ours
    features, mask = make_batch([300])
    plan = plan_audio_chunks(features, mask, n_window=TINY["n_window"])
    remat = AudioEncoder(module.config, RuntimeOptions(remat_policy="full"))

    def loss(m, p):
        tokens, token_mask = m.apply(p, plan.chunks, plan.chunk_lengths)
        return jnp.sum(jnp.where(token_mask[..., None], tokens, 0.0) ** 2)

    g0 = jax.grad(lambda p: loss(module, p))(params)
    g1 = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_sharded_equals_single_device(ours):
    from omni_jax.sharding.mesh import make_mesh
    from omni_jax.sharding.partition import batch_sharding, logical_shardings, rules_context

    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    module, params, apply = ours
    features, mask = make_batch(LENGTHS)
    plan = plan_audio_chunks(features, mask, chunk_bucket=4, n_window=TINY["n_window"])
    single = np.asarray(gather_audio_tokens(*apply(params, plan.chunks, plan.chunk_lengths)))

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), plan.chunks, plan.chunk_lengths)
    shardings = logical_shardings(abstract, mesh)
    sharded_params = jax.device_put(params, shardings)
    chunks = jax.device_put(plan.chunks, batch_sharding(mesh, 3))
    lengths = jax.device_put(plan.chunk_lengths, batch_sharding(mesh, 1))
    with jax.set_mesh(mesh), rules_context():
        tokens, token_mask = jax.jit(module.apply)(sharded_params, chunks, lengths)
    specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(sharded_params)}
    assert len(specs) > 1  # something is actually sharded
    np.testing.assert_allclose(np.asarray(gather_audio_tokens(tokens, token_mask)), single, atol=2e-5, rtol=0)
