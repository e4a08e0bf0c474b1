"""omni_jax.kernels.huge_pages: a served model's decode-layout weights are held, unchanged in value, in memory that
is 2 MiB aligned and advised for transparent huge pages, aliased by JAX without a copy; small arrays and the
switched-off case pass through untouched."""
from __future__ import annotations

import ctypes
import gc
import mmap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.kernels import huge_pages
from omni_jax.models import decode_layout
from omni_jax.models.layers import Einsum

# Off Linux, or with a Python whose mmap lacks MADV_HUGEPAGE, or with OMNI_JAX_CPU_HUGE_PAGES=0 set, `hold` returns
# its argument unchanged by design: there is no huge-page memory to check.
pytestmark = pytest.mark.skipif(not huge_pages.enabled(),
                                reason="huge_pages.hold is a no-op here (not Linux, no MADV_HUGEPAGE, or "
                                       "OMNI_JAX_CPU_HUGE_PAGES=0)")


def _thp_mode() -> str:
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled ("always", "madvise" or "never")."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else "[never]"
    return text[text.index("[") + 1:text.index("]")]


def test_hold_keeps_values_and_aliases_aligned_memory():
    array = jax.random.normal(jax.random.key(0), (3, 2048, 1024), jnp.bfloat16)  # 12 MiB
    held = huge_pages.hold(array)
    assert held is not array and held.shape == array.shape and held.dtype == array.dtype
    assert held.unsafe_buffer_pointer() % huge_pages.HUGE_PAGE == 0
    np.testing.assert_array_equal(np.asarray(held), np.asarray(array))
    del array
    gc.collect()  # the mapping lives as long as the array that aliases it
    assert float(jax.jit(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))(held)) > 0


@pytest.mark.skipif(_thp_mode() == "never", reason="THP is 'never' on this system: the kernel gives no huge pages "
                    "to any mapping, so there are none to find (alignment and aliasing are checked above)")
def test_held_memory_is_in_huge_pages():
    array = jnp.ones((16, 1024, 1024), jnp.float32)  # 64 MiB: 32 huge pages
    held = huge_pages.hold(array)
    # The kernel gives huge pages on a best-effort basis (it falls back to 4 KiB pages where it finds no free 2 MiB
    # block); with THP on, a fresh 64 MiB mapping on an idle test machine gets most of them.
    assert huge_pages.huge_page_bytes(held) >= held.nbytes // 2
    if _thp_mode() == "madvise":  # the control: memory nobody advised stays in 4 KiB pages
        assert huge_pages.huge_page_bytes(_UnadvisedRegion(held.nbytes)) < held.nbytes // 2


class _UnadvisedRegion:
    """A fresh private anonymous mapping of `size` bytes, written once and never advised, with the one method of
    an array that `huge_pages.huge_page_bytes` reads. (Not an XLA buffer: the allocator's mappings may lie next to,
    or be reused from, advised memory, so their huge pages are not the control's to predict.)"""

    def __init__(self, size: int):
        self.region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.region.write(b"\1" * size)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.region))

    def unsafe_buffer_pointer(self) -> int:
        return self.address


def test_small_and_switched_off_pass_through(monkeypatch):
    small = jnp.ones((256, 1024), jnp.float32)  # 1 MiB, below MIN_BYTES
    assert huge_pages.hold(small) is small
    large = jnp.ones((8, 1024, 1024), jnp.float32)
    monkeypatch.setenv("OMNI_JAX_CPU_HUGE_PAGES", "0")
    assert not huge_pages.enabled()
    assert huge_pages.hold(large) is large


def test_decode_layout_holds_converted_weights():
    """A converted projection weight above MIN_BYTES lies in huge-page memory; the layer's output is unchanged."""
    equation = "btd,dv->btv"
    layer = Einsum(equation, (512, 4096), (None, None), dtype=jnp.float32, param_dtype=jnp.float32)  # 8 MiB
    x = jax.random.normal(jax.random.key(1), (2, 1, 512), jnp.float32)
    params = nn.unbox(layer.init(jax.random.key(0), x))["params"]
    converted = decode_layout.to_decode_layout(params, {(): equation})
    assert converted["kernel_t"].unsafe_buffer_pointer() % huge_pages.HUGE_PAGE == 0
    np.testing.assert_array_equal(np.asarray(converted["kernel_t"]), np.asarray(params["kernel"]).T)
    want = layer.apply({"params": params}, x)
    got = layer.apply({"params": converted}, x)
    # Kernel and XLA sum the same float32 products in different orders: a few ulp of the output's scale.
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 2e-6
