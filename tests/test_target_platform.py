"""Paths follow the target platform, not the host (omni_jax.kernels.target).

No module under omni_jax/models/ asks JAX for the host's backend or devices; "auto" resolves from the mesh; the
one switch turns every CPU-only path off for another platform; and a TPU program compiled ahead of time on this
CPU host (libtpu's compile-only topology devices) holds the Mosaic attention kernels, forward and backward, and
none of the CPU machinery.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from omni_jax.config import OmniConfig, RuntimeOptions
from omni_jax.kernels import cache_attention, small_batch_matmul, target
from omni_jax.models import attention as attn
from omni_jax.models import decode_layout
from omni_jax.models.kv_cache import KVCache, storage_dtype
from omni_jax.models.layers import _needs_second_row
from omni_jax.models.thinker import Thinker, init_thinker
from omni_jax.sharding import batch_sharding, logical_shardings, make_mesh, rules_context

MODELS_DIR = Path(__file__).resolve().parents[1] / "omni_jax" / "models"
HOST_QUERIES = {"default_backend", "devices", "local_devices"}


# ----------------------------------------------------------------------------- (a) no host queries in models/


def _host_queries(source: str) -> list[str]:
    """`jax.default_backend` / `jax.devices` / `jax.local_devices` read in `source` (attribute or from-import)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in HOST_QUERIES and isinstance(node.value, ast.Name)
                and node.value.id == "jax"):
            found.append(f"line {node.lineno}: jax.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "jax":
            found += [f"line {node.lineno}: from jax import {a.name}" for a in node.names if a.name in HOST_QUERIES]
    return found


def test_models_do_not_ask_the_host():
    offenders = {path.name: _host_queries(path.read_text()) for path in sorted(MODELS_DIR.glob("*.py"))}
    offenders = {name: hits for name, hits in offenders.items() if hits}
    assert not offenders, f"modules under omni_jax/models/ read the host's backend/devices: {offenders}"
    assert _host_queries("import jax\nx = jax.default_backend()\nfrom jax import devices\n")  # the check bites


# ----------------------------------------------------------------------------- (b) resolution rules


def test_resolution_rules():
    cpu_mesh = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    assert target.resolve_platform("auto", cpu_mesh) == "cpu"
    assert target.resolve_platform(RuntimeOptions(), cpu_mesh) == "cpu"  # options: their `platform`
    assert target.resolve_platform("auto") == "cpu"  # no mesh: the first device (conftest: CPU)
    with jax.set_mesh(cpu_mesh):
        assert target.resolve_platform("auto") == "cpu"  # the mesh set by jax.set_mesh
    for explicit in ("cpu", "gpu", "tpu"):  # explicit values pass through, whatever the mesh
        assert target.resolve_platform(explicit, cpu_mesh) == explicit
        assert target.resolve_platform(RuntimeOptions(platform=explicit)) == explicit
    with pytest.raises(ValueError, match=r"platform = 'cuda'; expected one of \['auto', 'cpu', 'gpu', 'tpu'\]"):
        target.resolve_platform("cuda")
    with pytest.raises(ValueError, match=r"RuntimeOptions.platform = 'TPU'; expected one of"):
        RuntimeOptions(platform="TPU")


def test_entry_points_resolve_auto_once():
    """train.step.Trainer builds its modules with the mesh's platform (OmniModel and SpeechModel do the same)."""
    from train.step import Trainer

    config = OmniConfig.from_yaml("configs/models/tiny.yaml")
    mesh = make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    trainer = Trainer(Thinker(config.thinker, RuntimeOptions()), optax.sgd(0.1), mesh)
    assert trainer.thinker.options.platform == "cpu"


def test_one_switch():
    """Every CPU-only path is on for "cpu" (as before: this host is a CPU) and off for "tpu" and "gpu"."""
    q_prefill, q_decode = jnp.zeros((1, 256, 4, 64)), jnp.zeros((1, 1, 4, 64))
    k = jnp.zeros((1, 256, 2, 64))
    mask = attn.causal_mask(jnp.ones((1, 256), jnp.int32))
    row = jnp.zeros((1, 1, 64), jnp.bfloat16)
    w_t = jnp.zeros((32, 64), jnp.float32)
    bf16_cache = KVCache.init(2, 1, 8, 2, 64, jnp.bfloat16, platform="cpu")
    cpu_kernels = small_batch_matmul.available() and cache_attention.available()
    for platform, on in (("cpu", True), ("tpu", False), ("gpu", False)):
        assert target.cpu_paths(platform) == on
        assert attn._use_blocked(q_prefill, k, mask, platform) == on
        assert attn._use_decode(q_decode, platform) == on
        assert _needs_second_row("btd,df->btf", row, platform) == on
        assert (storage_dtype(jnp.bfloat16, platform) == jnp.uint16) == on
        assert (KVCache.init(2, 1, 8, 2, 64, jnp.bfloat16, platform=platform).k.dtype == jnp.uint16) == on
        assert decode_layout.applies(platform) == (on and small_batch_matmul.available())
        assert small_batch_matmul.use_kernel("btd,df->btf", jnp.zeros((2, 1, 64)), w_t, platform) == (
            on and cpu_kernels)
        assert cache_attention.use_kernel(4, bf16_cache.k, jnp.bfloat16, platform) == (on and cpu_kernels)
        assert target.pallas_interpret(platform) == on
    assert storage_dtype(jnp.float32, "cpu") == jnp.float32  # only 16-bit floats are held as bits


# ----------------------------------------------------------------------------- (c) an AOT TPU program


# FFI targets of the CPU kernels (omni_jax/kernels/*.py) and host callbacks: none may be in a TPU program
CPU_CUSTOM_CALLS = {small_batch_matmul._TARGET, cache_attention._SCORES, cache_attention._MIX,
                    "xla_python_cpu_callback", "xla_ffi_python_cpu_callback"}
MOSAIC = "tpu_custom_call"
SEQ_LEN, BATCH = 256, 4  # 2 blocks of 128 per sequence; batch 4 splits over fsdp 2


def _custom_calls(hlo_text: str) -> set[str]:
    return set(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def _assert_tpu_program(hlo_text: str, kernels: tuple[str, ...]):
    """Mosaic kernels named `kernels` present; no CPU custom call, no host callback, no take_rows barrier."""
    calls = _custom_calls(hlo_text)
    assert MOSAIC in calls, f"no Mosaic kernel in the program; custom calls: {sorted(calls)}"
    for kernel in kernels:
        assert kernel in hlo_text, f"Mosaic kernel {kernel} missing"
    cpu = {c for c in calls if c in CPU_CUSTOM_CALLS or c.startswith("omni_jax_") or "cpu" in c.lower()}
    assert not cpu, f"CPU custom calls in a TPU program: {sorted(cpu)}"
    assert "opt-barrier" not in hlo_text  # take_rows' XLA:CPU barrier


@pytest.fixture(scope="module")
def tpu_model():
    """(mesh fsdp=2 x tensor=2 of v5e:2x2 compile-only devices, tiny thinker for "tpu" with the pallas backend in
    bfloat16, its abstract params placed by the logical rules). Skipped without libtpu."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: no TPU topology to compile for (pip install 'omni-jax[tpu]')")
    from jax.experimental import topologies

    # compile-only use; lets this process load libtpu while another holds its lock (e.g. `omni-jax compile`)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, devices=devices)
    config = OmniConfig.from_yaml("configs/models/tiny.yaml")  # 2 layers, 4 heads / 2 kv heads, head_dim 16
    options = RuntimeOptions(dtype="bfloat16", param_dtype="bfloat16", attention_backend="pallas", platform="tpu")
    thinker = Thinker(config.thinker, options)
    boxed = jax.eval_shape(lambda: init_thinker(thinker, jax.random.key(0)))["params"]
    shardings = logical_shardings(boxed, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
    return mesh, thinker, params, shardings


def _sequence_inputs(mesh, length: int):
    """Abstract (input_ids [B, T], positions [3, B, T], segment_ids [B, T]) sharded on the batch."""
    ids = jax.ShapeDtypeStruct((BATCH, length), jnp.int32, sharding=batch_sharding(mesh, 2))
    positions = jax.ShapeDtypeStruct((3, BATCH, length), jnp.int32, sharding=batch_sharding(mesh, 3, 1))
    return ids, positions, ids


def test_tpu_forward_compiles_with_mosaic_attention(tpu_model):
    mesh, thinker, params, shardings = tpu_model

    def forward(params, ids, positions, segment_ids):  # -> logits [B, T, V]
        with rules_context():
            return thinker.apply({"params": params}, ids, positions, segment_ids).logits

    with jax.set_mesh(mesh):
        assert target.resolve_platform("auto") == "tpu"  # "auto" under this mesh is the TPU too
        logits = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
        compiled = jax.jit(forward, in_shardings=(shardings,) + (None,) * 3, out_shardings=logits).lower(
            params, *_sequence_inputs(mesh, SEQ_LEN)).compile()
    _assert_tpu_program(compiled.as_text(), ("omni_flash_fwd",))


def test_tpu_gradient_compiles_with_mosaic_backward(tpu_model):
    mesh, thinker, params, shardings = tpu_model

    def loss(params, ids, positions, segment_ids):  # mean logit: any scalar of the logits differentiates them
        with rules_context():
            logits = thinker.apply({"params": params}, ids, positions, segment_ids).logits
        return jnp.mean(logits.astype(jnp.float32))

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss), in_shardings=(shardings,) + (None,) * 3, out_shardings=shardings).lower(
            params, *_sequence_inputs(mesh, SEQ_LEN)).compile()
    _assert_tpu_program(compiled.as_text(), ("omni_flash_fwd", "omni_flash_bwd_dkv", "omni_flash_bwd_dq"))


def test_tpu_decode_step_holds_no_cpu_cache_machinery(tpu_model):
    """A cached decode step (T = 1) for the TPU: the bf16 cache holds bf16 (not uint16 bits) and the program has
    no uint16 array, CPU kernel or barrier; its attention is the Mosaic kernel."""
    mesh, thinker, params, shardings = tpu_model
    text = thinker.config.text
    cache = KVCache.init(text.num_hidden_layers, BATCH, SEQ_LEN, text.num_key_value_heads, text.head_dim,
                         jnp.bfloat16, platform="tpu")
    assert cache.k.dtype == jnp.bfloat16
    cache_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None, "tensor", None))
    abstract_cache = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cache_sharding if a.ndim == 5 else
                                       NamedSharding(mesh, PartitionSpec())), cache)

    def step(params, ids, positions, segment_ids, cache):  # -> (logits [B, 1, V], cache)
        with rules_context():
            out = thinker.apply({"params": params}, ids, positions, segment_ids, cache, last_logits_only=True)
        return out.logits, out.cache

    with jax.set_mesh(mesh):
        compiled = jax.jit(step, in_shardings=(shardings,) + (None,) * 4).lower(
            params, *_sequence_inputs(mesh, 1), abstract_cache).compile()
    hlo = compiled.as_text()
    _assert_tpu_program(hlo, ("omni_flash_fwd",))
    assert not re.search(r"\bu16\[", hlo), "a uint16 array (the CPU cache storage) in a TPU program"
