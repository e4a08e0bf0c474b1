// Horizontal sums of 16-lane float32 accumulators, 8 at a time (shared by the CPU kernels of this directory;
// kernels/build.py hashes this header into each kernel's cache key).
#ifndef OMNI_JAX_KERNELS_LANE_SUMS_H_
#define OMNI_JAX_KERNELS_LANE_SUMS_H_

#include <immintrin.h>

namespace omni_jax {

// Lane-sum helpers: the 8 lane sums of 8 vectors in one pass (24 shuffles/adds for 8 outputs).
inline __m512 AddHalves(__m512 a, __m512 b) {  // [a lanes 0-7 + 8-15 | b lanes 0-7 + 8-15]
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}

inline __m512 AddQuarters(__m512 a, __m512 b) {  // 128-bit lanes: 4 partial sums of a, b, c, d
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

inline __m256 LaneSums8(const __m512* v) {
  const __m512 abcd = AddQuarters(AddHalves(v[0], v[1]), AddHalves(v[2], v[3]));
  const __m512 efgh = AddQuarters(AddHalves(v[4], v[5]), AddHalves(v[6], v[7]));
  // per 128-bit lane l: [source l of abcd: 2 partials, source l of efgh: 2 partials], then summed pairwise
  __m512 r = _mm512_add_ps(_mm512_shuffle_ps(abcd, efgh, 0x44), _mm512_shuffle_ps(abcd, efgh, 0xEE));
  r = _mm512_add_ps(r, _mm512_shuffle_ps(r, r, 0xB1));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r));
}

// out[t] = the sum of acc[t]'s 16 lanes, t < C.
template <int C>
inline void StoreLaneSums(const __m512* acc, float* out) {
#pragma GCC unroll 8
  for (int g = 0; g < C; g += 8) {
    __m512 group[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) group[i] = g + i < C ? acc[g + i] : _mm512_setzero_ps();
    const int count = C - g < 8 ? C - g : 8;
    _mm256_mask_storeu_ps(out + g, __mmask8((1u << count) - 1), LaneSums8(group));
  }
}

}  // namespace omni_jax

#endif  // OMNI_JAX_KERNELS_LANE_SUMS_H_
