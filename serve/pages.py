"""Pages of the paged KV cache: which are free, and which a slot owns.

The pool (`N` pages of `page_size` token slots per layer) is split into `num_shards` equal parts, one per shard of
the rows on a mesh (1 without one); a slot's pages come from its shard's part, and page tables hold shard-local
ids. Page 0 of every part is the scratch page (`omni_jax.kernels.paged_attention.SCRATCH_PAGE`) and is never
handed out.
"""
from __future__ import annotations

from omni_jax.kernels.paged_attention import SCRATCH_PAGE


class OutOfPages(RuntimeError):
    """No free page in a shard's part of the pool."""


class PageAllocator:
    def __init__(self, pages_per_shard: int, page_size: int, num_shards: int = 1):
        if pages_per_shard < 2:
            raise ValueError(f"pages_per_shard must be >= 2 (page 0 is scratch), got {pages_per_shard}")
        self.pages_per_shard = int(pages_per_shard)
        self.page_size = int(page_size)
        self.num_shards = int(num_shards)
        self._free = [[p for p in range(self.pages_per_shard - 1, -1, -1) if p != SCRATCH_PAGE]
                      for _ in range(self.num_shards)]

    @property
    def num_pages(self) -> int:
        """Pages in the whole pool (all shards, scratch pages included)."""
        return self.pages_per_shard * self.num_shards

    def free_pages(self, shard: int) -> int:
        return len(self._free[shard])

    @property
    def pages_in_use(self) -> int:
        return sum(self.pages_per_shard - 1 - len(f) for f in self._free)

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` token slots."""
        return -(-int(tokens) // self.page_size)

    def grow(self, shard: int, pages: list[int], tokens: int) -> None:
        """Append pages to `pages` (a slot's, in order) until they hold `tokens`; OutOfPages if the shard runs out
        (then `pages` is unchanged)."""
        need = self.pages_for(tokens) - len(pages)
        if need <= 0:
            return
        free = self._free[shard]
        if need > len(free):
            raise OutOfPages(f"shard {shard}: {need} more pages needed, {len(free)} free")
        pages.extend(free.pop() for _ in range(need))

    def release(self, shard: int, pages: list[int]) -> None:
        """Return a slot's pages to its shard (and empty the list)."""
        self._free[shard].extend(reversed(pages))
        pages.clear()
