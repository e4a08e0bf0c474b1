"""Vision encoder parity with HF `Qwen2_5OmniVisionEncoder` (float32, tiny random model) and plan checks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta
from transformers import Qwen2_5OmniVisionEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from omni_jax.config import RuntimeOptions, VisionEncoderConfig
from omni_jax.models.vision_encoder import VisionEncoder, plan_vision

TOL = 1e-4
HF_KW = dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=48,
             fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
             temporal_patch_size=2, in_channels=3)
CONFIG = VisionEncoderConfig(**{**HF_KW, "fullatt_block_indexes": (1,)})
PATCH_DIM = 3 * 2 * 14 * 14

GRIDS = {
    "image_not_window_multiple": [[1, 10, 14]],  # merged 5 x 7: windows padded
    "several_images": [[1, 10, 14], [1, 4, 4], [1, 18, 8], [1, 8, 8]],
    "video": [[3, 8, 12]],  # 3 frames of merged 4 x 6
    "tiny_image": [[1, 2, 2]],
    "mixed": [[1, 2, 2], [2, 12, 10], [1, 16, 18]],
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.1^2): O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim == 1:  # norm1, norm2, ln_q
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(int(np.prod(p.shape[1:]))))


def convert_hf_vision(state_dict, config: VisionEncoderConfig) -> dict:
    """HF `Qwen2_5OmniVisionEncoder` state_dict -> our param tree (blocks stacked on a leading axis)."""
    sd = {k: v.detach().float().numpy() for k, v in state_dict.items()}
    C, H, d, L = config.hidden_size, config.num_heads, config.head_dim, config.depth

    def stack(fn):
        return np.stack([fn(i) for i in range(L)])

    def block(name):
        return lambda i: sd[f"blocks.{i}.{name}"]

    blocks = {
        "norm1": {"scale": stack(block("norm1.weight"))},
        "norm2": {"scale": stack(block("norm2.weight"))},
        "attn": {
            **{p: {"kernel": stack(lambda i, p=p: sd[f"blocks.{i}.attn.{p}.weight"].T.reshape(C, H, d)),
                   "bias": stack(lambda i, p=p: sd[f"blocks.{i}.attn.{p}.bias"].reshape(H, d))}
               for p in ("q", "k", "v")},
            "proj": {"kernel": stack(lambda i: sd[f"blocks.{i}.attn.proj.weight"].T.reshape(H, d, C)),
                     "bias": stack(block("attn.proj.bias"))},
        },
        "mlp": {p: {"kernel": stack(lambda i, p=p: sd[f"blocks.{i}.mlp.{p}.weight"].T),
                    "bias": stack(block(f"mlp.{p}.bias"))} for p in ("gate_proj", "up_proj", "down_proj")},
    }
    weight = sd["patch_embed.proj.weight"]  # [C, in, T, P, P]
    return {
        "patch_embed": {"kernel": weight.reshape(weight.shape[0], -1).T},
        "blocks": blocks,
        "merger": {
            "ln_q": {"scale": sd["merger.ln_q.weight"]},
            "mlp_0": {"kernel": sd["merger.mlp.0.weight"].T, "bias": sd["merger.mlp.0.bias"]},
            "mlp_2": {"kernel": sd["merger.mlp.2.weight"].T, "bias": sd["merger.mlp.2.bias"]},
        },
    }


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    hf_config = Qwen2_5OmniVisionEncoderConfig(**HF_KW)
    hf_config._attn_implementation = "eager"
    hf = Qwen2_5OmniVisionEncoder(hf_config).eval()
    _randomize(hf, seed=0)
    params = {"params": jax.tree_util.tree_map(jnp.asarray, convert_hf_vision(hf.state_dict(), CONFIG))}
    model = VisionEncoder(CONFIG, RuntimeOptions())
    return hf, model, params


def _pixels(grid, seed=0):
    n = int(np.prod(np.asarray(grid), axis=-1).sum())
    return np.random.default_rng(seed).standard_normal((n, PATCH_DIM)).astype(np.float32)


def _hf_forward(hf, pixels, grid):
    with torch.no_grad():
        out = hf(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
    return out.pooler_output.numpy()


def _ours(model, params, pixels, grid, bucket=None, jit=False):
    plan = plan_vision(grid, CONFIG, num_patches_bucket=bucket)
    apply = jax.jit(model.apply) if jit else model.apply
    out = apply(params, jnp.asarray(plan.pad_pixel_values(pixels)), plan.arrays)
    assert out.shape == (plan.num_patches_padded // 4, CONFIG.out_hidden_size)
    return np.asarray(plan.unpad(out)), plan


def test_param_tree_matches_init(setup):
    _, model, params = setup
    grid = GRIDS["tiny_image"]
    plan = plan_vision(grid, CONFIG)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((4, PATCH_DIM)), plan.arrays)
    init_shapes = jax.tree_util.tree_map(lambda x: x.shape, meta.unbox(boxed))
    ours = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert init_shapes == ours
    # Every parameter carries logical axes, and the scanned blocks lead with "layers".
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))
    for path, leaf in leaves:
        assert isinstance(leaf, meta.Partitioned), path
        assert len(leaf.names) == leaf.value.ndim, path
        if "blocks" in jax.tree_util.keystr(path):
            assert leaf.names[0] == "layers", path
    blocks = params["params"]["blocks"]
    assert blocks["attn"]["q"]["kernel"].shape == (3, 32, 4, 8)
    assert blocks["attn"]["proj"]["kernel"].shape == (3, 4, 8, 32)
    assert params["params"]["merger"]["mlp_0"]["kernel"].shape == (128, 128)
    assert params["params"]["patch_embed"]["kernel"].shape == (PATCH_DIM, 32)


@pytest.mark.parametrize("name", list(GRIDS))
def test_plan_matches_hf(name):
    grid = GRIDS[name]
    plan = plan_vision(grid, CONFIG)
    arrays = plan.arrays
    window_index, cu_window = get_vision_window_index(torch.tensor(grid), 2, 112, 14)
    np.testing.assert_array_equal(arrays.window_index, window_index.numpy())
    np.testing.assert_array_equal(arrays.inverse_window_index, np.argsort(window_index.numpy()))

    def boundaries(seg):
        return np.flatnonzero(np.diff(np.concatenate([[0], seg, [-1]])))

    np.testing.assert_array_equal(boundaries(arrays.window_segment_ids), cu_window.numpy())
    np.testing.assert_array_equal(boundaries(arrays.frame_segment_ids), get_vision_cu_seqlens(torch.tensor(grid)))
    positions = get_vision_position_ids(torch.tensor(grid), 2).numpy()
    np.testing.assert_array_equal(arrays.rotary_positions,
                                  positions.reshape(-1, 4, 2)[window_index.numpy()].reshape(-1, 2))


@pytest.mark.parametrize("name", list(GRIDS))
def test_matches_hf(setup, name):
    hf, model, params = setup
    grid = GRIDS[name]
    pixels = _pixels(grid)
    expected = _hf_forward(hf, pixels, grid)
    ours, plan = _ours(model, params, pixels, grid)
    assert ours.shape == expected.shape
    assert np.abs(expected).max() > 0.3  # activations are O(1), so the absolute tolerance means something
    err = np.abs(ours - expected).max()
    assert err < TOL, f"{name}: max abs error {err}"
    assert [p.shape[0] for p in plan.split(ours)] == [t * h * w // 4 for t, h, w in grid]


def test_video_full_attention_stays_within_frame(setup):
    """Changing frame 2's pixels must not change frame 0's outputs (even in the full-attention block)."""
    _, model, params = setup
    grid = GRIDS["video"]
    pixels = _pixels(grid)
    changed = pixels.copy()
    per_frame = 8 * 12
    changed[2 * per_frame:] += 1.0
    a, _ = _ours(model, params, pixels, grid)
    b, _ = _ours(model, params, changed, grid)
    tokens = per_frame // 4
    np.testing.assert_array_equal(a[:2 * tokens], b[:2 * tokens])
    assert np.abs(a[2 * tokens:] - b[2 * tokens:]).max() > 1e-2


def test_bucket_padding_and_jit(setup):
    """Padding to a bucket does not change the output, and two different grids in one bucket share one
    compiled function."""
    _, model, params = setup
    bucket = 600
    encode = jax.jit(model.apply)
    for seed, name in enumerate(("several_images", "mixed")):
        grid = GRIDS[name]
        pixels = _pixels(grid, seed=seed + 1)
        plain, _ = _ours(model, params, pixels, grid)
        plan = plan_vision(grid, CONFIG, num_patches_bucket=bucket)
        assert plan.num_patches_padded == bucket and plan.num_patches < bucket
        out = encode(params, jnp.asarray(plan.pad_pixel_values(pixels)), plan.arrays)
        assert out.shape == (bucket // 4, CONFIG.out_hidden_size)
        np.testing.assert_allclose(np.asarray(plan.unpad(out)), plain, atol=1e-5, rtol=0)
    assert encode._cache_size() == 1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"grid_thw\[1\].*divisible"):
        plan_vision([[1, 4, 4], [1, 3, 4]], CONFIG)
    with pytest.raises(ValueError, match=r"grid_thw\[0\].*positive"):
        plan_vision([[0, 4, 4]], CONFIG)
    with pytest.raises(ValueError, match="num_patches_bucket"):
        plan_vision([[1, 4, 4]], CONFIG, num_patches_bucket=8)
    with pytest.raises(ValueError, match="multiple"):
        plan_vision([[1, 4, 4]], CONFIG, num_patches_bucket=18)
    plan = plan_vision([[1, 4, 4]], CONFIG)
    with pytest.raises(ValueError, match="describes 16"):
        plan.pad_pixel_values(np.zeros((12, PATCH_DIM), np.float32))
