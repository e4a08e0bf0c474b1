// Run items 0..n-1 of a kernel call on XLA's intra-op thread pool and the calling thread (shared by the CPU
// kernels of this directory; kernels/build.py hashes this header into each kernel's cache key).
#ifndef OMNI_JAX_KERNELS_POOL_ITEMS_H_
#define OMNI_JAX_KERNELS_POOL_ITEMS_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace omni_jax {

// Calls item(i) once for every i in [0, n), from the calling thread and up to pool.num_threads() - 1 pool tasks,
// which take indices from a shared counter; returns when all n have finished. The state lives in a shared_ptr
// held by each task, so a task still leaving the loop after the last item never touches freed memory.
template <typename Item>
void RunOnPool(xla::ffi::ThreadPool& pool, int64_t n, Item item) {
  struct State {
    Item item;
    int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    State(Item f, int64_t count) : item(std::move(f)), n(count) {}
    void Drain() {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        item(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(item), n);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()) - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Drain(); });
  state->Drain();
  while (state->done.load(std::memory_order_acquire) < n) _mm_pause();
}

}  // namespace omni_jax

#endif  // OMNI_JAX_KERNELS_POOL_ITEMS_H_
