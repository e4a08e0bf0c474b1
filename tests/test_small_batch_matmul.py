"""omni_jax.kernels.small_batch_matmul: the CPU decode-step projection kernel (weights in the decode layout) equals
XLA's einsum (float32 and bfloat16 operands, f32 accumulation, bfloat16 with and without AVX512_BF16), is chosen
only where it applies, and is what decode steps run."""
from __future__ import annotations

import math
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np
import pytest

import kernel_paths
from omni_jax.kernels import build, small_batch_matmul
from omni_jax.models import decode_layout
from omni_jax.models.layers import Einsum

# The kernel needs AVX-512 or AVX2 with FMA (checked in /proc/cpuinfo); CI machines of this project have one or the
# other (AVX-512 with AVX512_BF16, or AVX2 only). Elsewhere the model runs through jnp.einsum and these tests have
# nothing to check.
pytestmark = pytest.mark.skipif(not build.cpu_has_features(), reason=kernel_paths.SKIP_WITHOUT_KERNELS)

# Layer outputs: both sides sum the same float32 products (bf16 x bf16 products are exact in f32) over K <= 64
# terms in different orders: a few float32 ulp of the output's scale.
RTOL = 2e-6
EPS32 = float(np.finfo(np.float32).eps)


def _reference(equation, x, w):
    return jnp.einsum(equation, x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")


def _max_rel_err(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def test_builds_and_registers():
    assert small_batch_matmul.available()


def test_instruction_set_choice(monkeypatch, tmp_path):
    """The widest instruction set the CPU has, or the one OMNI_JAX_CPU_KERNEL_ISA names if the CPU has it (else
    none: the model then runs on XLA); each set compiles into its own cached library."""
    from omni_jax.kernels import build

    cpu = Path("/proc/cpuinfo").read_text().split()
    has_avx512 = all(flag in cpu for flag in build.ISAS["avx512"][0])
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    assert build.cpu_isa() == ("avx512" if has_avx512 else "avx2")
    monkeypatch.setenv(build.ISA_ENV, "avx2")
    assert build.cpu_isa() == "avx2"
    monkeypatch.setenv(build.ISA_ENV, "avx512")
    assert build.cpu_isa() == ("avx512" if has_avx512 else None)
    monkeypatch.setenv(build.ISA_ENV, "sse2")
    assert build.cpu_isa() is None
    monkeypatch.setenv("OMNI_JAX_KERNEL_CACHE", str(tmp_path))  # compiling needs the compiler only, not the CPU
    source = Path(small_batch_matmul.__file__).with_name("small_batch_matmul.cc")
    libraries = {build.compile_source(source, isa) for isa in build.ISAS}
    assert len(libraries) == len(build.ISAS) and all(library.parent == tmp_path for library in libraries)


SHAPES = [(1, 1, 1), (1, 896, 4864), (2, 7, 33), (3, 100, 1000), (5, 17, 15), (8, 4864, 896), (8, 64, 2049),
          (7, 130, 96), (4, 33, 4097), (8, 1001, 300), (4, 24, 40), (6, 9, 70), (1, 31, 17), (8, 32, 7), (2, 15, 9)]


def _check_against_float64(x, w_t, got):
    # float32 summation of K products is within K * eps32 * sum_k |x_mk w_nk| of the exact sum (the classical
    # bound for any summation order; bf16 x bf16 products are exact in f32); a wrong or missing product breaks it
    # by orders of magnitude.
    x64, w64 = np.asarray(x, np.float64), np.asarray(w_t, np.float64)
    bound = x64.shape[1] * EPS32 * (np.abs(x64) @ np.abs(w64).T)
    assert np.all(np.abs(np.asarray(got, np.float64) - x64 @ w64.T) <= bound)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_matmul_equals_einsum(dtype, rows, k, n):
    """Tails of every size: weight rows not a multiple of the register tile (3-16 rows) or of a work item, K not a
    multiple of the 32- (bf16) or 16-element (f32) chunk, or shorter than one."""
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w_t = jnp.asarray(rng.standard_normal((n, k)), dtype)
    got = jax.jit(small_batch_matmul.matmul)(x, w_t)
    assert got.dtype == jnp.float32 and got.shape == (rows, n)
    _check_against_float64(x, w_t, got)


_FRESH_PROCESS_CHECK = """
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, {tests!r})
from test_small_batch_matmul import SHAPES, _check_against_float64
from omni_jax.kernels import build, small_batch_matmul
print("isa", build.cpu_isa())
for dtype in {dtypes}:
    for rows, k, n in SHAPES:
        rng = np.random.default_rng(rows * 1000 + k + n)
        x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
        w_t = jnp.asarray(rng.standard_normal((n, k)), dtype)
        _check_against_float64(x, w_t, jax.jit(small_batch_matmul.matmul)(x, w_t))
print("checked", len(SHAPES))
"""


@kernel_paths.FORCED_PATHS
def test_forced_paths_in_a_fresh_process(variable, value, dtypes, isa):
    """The widened bfloat16 weight and the AVX2 build (kernel_paths), checked against float64 on every shape."""
    assert f"checked {len(SHAPES)}" in kernel_paths.run_forced(_FRESH_PROCESS_CHECK, variable, value, dtypes, isa)


@pytest.mark.parametrize("equation,x_shape,w_shape", [("btd,dnh->btnh", (2, 1, 48), (48, 4, 8)),
                                                      ("btnh,nhd->btd", (8, 1, 4, 8), (4, 8, 40)),
                                                      ("btd,dv->btv", (1, 1, 64), (64, 1000)),
                                                      ("bd,de->be", (3, 16), (16, 24))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_module_uses_kernel_and_matches(equation, x_shape, w_shape, dtype):
    """The Einsum layer on decode-layout params takes the kernel for decode-step shapes (an ffi_call in its jaxpr,
    no dot) and gives what XLA's einsum gives on the standard params; gradients through it equal XLA's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    layer = Einsum(equation, w_shape, (None,) * len(w_shape), dtype=dtype, param_dtype=dtype)
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))
    w = params["params"]["kernel"]
    t_params = {"params": decode_layout.to_decode_layout(params["params"], {(): equation})}
    w_t = t_params["params"]["kernel_t"]
    assert set(t_params["params"]) == {"kernel_t"}
    assert small_batch_matmul.use_kernel(equation, x, w_t)
    primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(layer.apply)(t_params, x).jaxpr.eqns}
    assert any("ffi" in name or "custom_vjp" in name for name in primitives), primitives
    assert "dot_general" not in primitives
    got = layer.apply(t_params, x).astype(jnp.float32)
    want = _reference(equation, x, w).astype(dtype).astype(jnp.float32)
    tol = RTOL if dtype == jnp.float32 else 8e-3  # bf16 output rounding: half an ulp of 2^-8
    assert _max_rel_err(got, want) < tol

    def loss(kernel_on, x, w_t):
        if kernel_on:
            y = small_batch_matmul.einsum(equation, x, w_t)
        else:
            y = jnp.einsum(small_batch_matmul.decode_layout_equation(equation), x, w_t,
                           preferred_element_type=jnp.float32)
        return jnp.sum(jnp.sin(y))

    got_grads = jax.grad(lambda *a: loss(True, *a), argnums=(0, 1))(x, w_t)
    want_grads = jax.grad(lambda *a: loss(False, *a), argnums=(0, 1))(x, w_t)
    # Both backward passes are XLA's einsum; they differ only through cos(y), whose y the kernel summed in another
    # order (f32 rounding, ~1e-6 relative): 1e-4 in float32. bf16 gradients are rounded to bf16, where such a
    # difference can flip the last bit (2^-8 = 3.9e-3 relative): 2e-2 allows a few such flips.
    for got_g, want_g in zip(got_grads, want_grads):
        assert got_g.dtype == want_g.dtype
        np.testing.assert_allclose(np.asarray(got_g, np.float32), np.asarray(want_g, np.float32),
                                   rtol=1e-4 if dtype == jnp.float32 else 2e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_module_on_the_decode_layout_beyond_the_kernel(dtype):
    """More than 8 rows (prefill) on decode-layout params: XLA's einsum on the transposed weight, equal to the
    standard layout's result (float32: a few ulp; bfloat16: the same products, then one rounding of the output)."""
    equation = "btnh,nhd->btd"
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 4, 8)), dtype)
    layer = Einsum(equation, (4, 8, 40), (None,) * 3, dtype=dtype, param_dtype=dtype)
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))
    t_params = {"params": decode_layout.to_decode_layout(params["params"], {(): equation})}
    assert t_params["params"]["kernel_t"].shape == (40, 4, 8)
    assert not small_batch_matmul.use_kernel(equation, x, t_params["params"]["kernel_t"])
    got = layer.apply(t_params, x).astype(jnp.float32)
    want = layer.apply(params, x).astype(jnp.float32)
    assert _max_rel_err(got, want) < (RTOL if dtype == jnp.float32 else 8e-3)


def _weight_sized_copies(hlo: str, weight_size: int) -> list[str]:
    """Instructions of a compiled module that produce an array of the weight's size other than parameters and
    bitcasts: copies or transposes of it."""
    found = []
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]", line)
        if match and math.prod(int(d) for d in match.group(1).split(",") if d) == weight_size:
            if "parameter(" not in line and " bitcast(" not in line:
                found.append(line.strip()[:100])
    return found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_layout_prefill_does_not_copy_the_weight(dtype):
    """Beyond 8 rows the decode-layout weight goes to XLA as one [N, K] matrix. Given as [N..., K...] with several
    output or contracted dims (the attention projections), XLA:CPU transposed it back to [K, N] at every call
    (the control below): ~90 MB of copies per prefill of the 0.5B thinker."""
    equation = "btnh,nhd->btd"
    x = jnp.ones((3, 5, 4, 8), dtype)
    layer = Einsum(equation, (4, 8, 40), (None,) * 3, dtype=dtype, param_dtype=dtype)
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))
    t_params = {"params": decode_layout.to_decode_layout(params["params"], {(): equation})}
    hlo = jax.jit(layer.apply).lower(t_params, x).compile().as_text()
    assert _weight_sized_copies(hlo, 40 * 4 * 8) == []
    control = jax.jit(lambda x, w: jnp.einsum(small_batch_matmul.decode_layout_equation(equation), x, w,
                                              preferred_element_type=jnp.float32))
    assert _weight_sized_copies(control.lower(x, t_params["params"]["kernel_t"]).compile().as_text(), 40 * 4 * 8)


def test_where_it_does_not_apply():
    f32 = jnp.zeros((2, 1, 16), jnp.float32)
    w = jnp.zeros((16, 8), jnp.float32)
    w = jnp.zeros((8, 16), jnp.float32)  # decode layout [F, D]
    assert small_batch_matmul.use_kernel("btd,df->btf", f32, w)
    assert small_batch_matmul.use_kernel("btd,df->btf", f32[:1], w)
    assert not small_batch_matmul.use_kernel("btd,df->btf", jnp.zeros((9, 1, 16)), w)  # > 8 rows: XLA's GEMM
    assert not small_batch_matmul.use_kernel("btd,df->btf", f32, w.astype(jnp.bfloat16))  # mixed dtypes
    assert not small_batch_matmul.use_kernel("btd,fd->btf", f32, jnp.zeros((8, 16)))  # not rows.contracted
    assert small_batch_matmul.decode_layout_equation("btd,fd->btf") is None  # such weights keep their layout
    assert not small_batch_matmul.use_kernel("bd,dce->bec", jnp.zeros((2, 16)), jnp.zeros((16, 3, 5)))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):  # the SPMD partitioner cannot split a custom call: sharded runs stay on XLA
        assert not small_batch_matmul.use_kernel("btd,df->btf", f32, w)


def test_switch_off(monkeypatch):
    monkeypatch.setenv(small_batch_matmul.ENV_SWITCH, "0")
    small_batch_matmul.available.cache_clear()
    try:
        assert not small_batch_matmul.use_kernel("btd,df->btf", jnp.zeros((2, 1, 16)), jnp.zeros((16, 8)))
    finally:
        monkeypatch.delenv(small_batch_matmul.ENV_SWITCH)
        small_batch_matmul.available.cache_clear()
    assert small_batch_matmul.available()
