"""CPU weights held in transparent huge pages (2 MiB), for the decode step's weight stream.

A decode step reads every projection weight of the language model from DRAM once, in order. XLA's CPU buffers
come from malloc, in 4 KiB pages unless the whole process started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(every allocation then; measured no faster for the decode step, perhaps because its temporaries then fault in
2 MiB at a time: not verified). On the 2-core AMD EPYC VM this was built on, a 2-thread read of 2.6 GB ran 42 GB/s
on 4 KiB pages and 46-50 GB/s on huge pages, measured in the same process; a batch-1 talker decode step got 3-4%
faster, an 8-row one no faster (docs/performance.md).

`hold(array)` copies one large array into an anonymous mapping aligned to 2 MiB and advised `MADV_HUGEPAGE`, and
hands that memory to JAX without a copy (`jax.device_put(..., may_alias=True)` aliases a host numpy array on the
CPU backend). The copy runs once, at load (~0.4 s for 2.6 GB here). Where the kernel does not give huge pages
(THP "never", other systems) the mapping is ordinary memory and nothing is lost. `OMNI_JAX_CPU_HUGE_PAGES=0` turns
it off (for A/B measurements).
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import sys

import jax
import numpy as np

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes, x86-64's PMD-sized transparent huge page
MIN_BYTES = 2 * HUGE_PAGE  # below this an array spans at most one huge page: not worth a mapping of its own


def enabled() -> bool:
    """Linux with MADV_HUGEPAGE available, and not switched off with OMNI_JAX_CPU_HUGE_PAGES=0."""
    return (os.environ.get("OMNI_JAX_CPU_HUGE_PAGES", "1") != "0" and sys.platform.startswith("linux")
            and hasattr(mmap, "MADV_HUGEPAGE"))


def hold(array: jax.Array) -> jax.Array:
    """`array` (on one CPU device) as a new array of equal value whose buffer lies in memory advised for huge pages;
    `array` itself where that does not apply (not enabled, smaller than MIN_BYTES, not a single CPU device) or where
    JAX would not alias the memory (then it is logged, and the aliasing copy is dropped)."""
    if (not enabled() or not isinstance(array, jax.Array) or array.nbytes < MIN_BYTES
            or len(array.devices()) != 1 or next(iter(array.devices())).platform != "cpu"):
        return array
    try:
        region = mmap.mmap(-1, array.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError as error:
        log.warning("huge-page mapping of %d bytes failed, keeping the array as is: %s", array.nbytes, error)
        return array
    raw = np.frombuffer(region, dtype=np.uint8)  # holds `region` open for as long as a view of it lives
    start = -raw.ctypes.data % HUGE_PAGE
    host = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(host, np.asarray(array))
    held = jax.device_put(host, array.sharding, may_alias=True)
    if held.unsafe_buffer_pointer() != host.ctypes.data:
        log.warning("JAX copied the huge-page array of shape %s instead of aliasing it; keeping the original",
                    array.shape)
        return array
    return held


def huge_page_bytes(array: jax.Array) -> int:
    """Bytes of huge pages (AnonHugePages) in the memory mapping that holds `array`'s buffer, from
    /proc/self/smaps; 0 where it cannot be read. The kernel may merge adjacent mappings, so this can count huge
    pages of a neighbour as well: a check, not an exact measure."""
    pointer = array.unsafe_buffer_pointer()
    try:
        text = open("/proc/self/smaps").read()
    except OSError:
        return 0
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        low, high = (int(v, 16) for v in block.split(" ", 1)[0].split("-"))
        if low <= pointer < high:
            found = re.search(r"^AnonHugePages:\s+(\d+) kB", block, re.MULTILINE)
            return int(found.group(1)) * 1024 if found else 0
    return 0
