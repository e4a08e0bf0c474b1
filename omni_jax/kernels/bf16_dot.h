// Whether the CPU kernels of this directory use AVX512_BF16's pairwise dot product (`vdpbf16ps`) for bfloat16
// operands (kernels/build.py hashes this header into each kernel's cache key).
#ifndef OMNI_JAX_KERNELS_BF16_DOT_H_
#define OMNI_JAX_KERNELS_BF16_DOT_H_

#include <cstdlib>
#include <cstring>

// Functions that may inline the dot product carry this target; only code reached when HasBf16Dot() holds emits it.
// A kernel compiled for AVX2 (kernels/simd.h) has no such code: the target is empty and HasBf16Dot() false.
#if defined(__AVX512F__)
#define OMNI_JAX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define OMNI_JAX_TARGET
#endif

namespace omni_jax {

// Checked once: the CPU has AVX512_BF16, and OMNI_JAX_CPU_BF16_WIDEN is not "1" (which forces the path that
// widens bfloat16 to float32 in registers, for tests of that fallback on machines that have the instruction).
inline bool HasBf16Dot() {
#if defined(__AVX512F__)
  static const bool has = [] {
    const char* widen = std::getenv("OMNI_JAX_CPU_BF16_WIDEN");
    return __builtin_cpu_supports("avx512bf16") && !(widen != nullptr && std::strcmp(widen, "1") == 0);
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace omni_jax

#endif  // OMNI_JAX_KERNELS_BF16_DOT_H_
