// The float32 vector the CPU kernels of this directory compute with, for the instruction set they are compiled
// for: AVX-512 (16 lanes, 32 registers) where the CPU has it, else AVX2 with FMA (8 lanes, 16 registers);
// kernels/build.py picks the flags and hashes this header into each kernel's cache key. Loads of float32 and of
// bfloat16 bits (widened to float32 exactly), tails of fewer than kLanes elements (zeros beyond), the multiply-add
// and the lane sums of several accumulators.
#ifndef OMNI_JAX_KERNELS_SIMD_H_
#define OMNI_JAX_KERNELS_SIMD_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace omni_jax::simd {

#if defined(__AVX512F__)

using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kRegisters = 32;

inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Set1(float x) { return _mm512_set1_ps(x); }
inline Vec Fmadd(Vec a, Vec b, Vec acc) { return _mm512_fmadd_ps(a, b, acc); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Widen(__m256i half) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)); }
inline Vec Load(const uint16_t* p) { return Widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec LoadTail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
inline Vec LoadTail(const uint16_t* p, int64_t n) { return Widen(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p)); }

// Lane-sum helpers: the 8 lane sums of 8 vectors in one pass (24 shuffles/adds for 8 outputs).
inline Vec AddHalves(Vec a, Vec b) {  // [a lanes 0-7 + 8-15 | b lanes 0-7 + 8-15]
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}

inline Vec AddQuarters(Vec a, Vec b) {  // 128-bit lanes: 4 partial sums of a, b, c, d
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// out[i] = the sum of v[i]'s lanes, i < count <= 8.
inline void StoreSums8(const Vec* v, float* out, int count) {
  const Vec abcd = AddQuarters(AddHalves(v[0], v[1]), AddHalves(v[2], v[3]));
  const Vec efgh = AddQuarters(AddHalves(v[4], v[5]), AddHalves(v[6], v[7]));
  // per 128-bit lane l: [source l of abcd: 2 partials, source l of efgh: 2 partials], then summed pairwise
  Vec r = _mm512_add_ps(_mm512_shuffle_ps(abcd, efgh, 0x44), _mm512_shuffle_ps(abcd, efgh, 0xEE));
  r = _mm512_add_ps(r, _mm512_shuffle_ps(r, r, 0xB1));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm256_mask_storeu_ps(out, __mmask8((1u << count) - 1), _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r)));
}

#else  // AVX2 + FMA

using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kRegisters = 16;

inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Set1(float x) { return _mm256_set1_ps(x); }
inline Vec Fmadd(Vec a, Vec b, Vec acc) { return _mm256_fmadd_ps(a, b, acc); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Widen(__m128i half) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)); }
inline Vec Load(const uint16_t* p) { return Widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec LoadTail(const float* p, int64_t n) {  // lanes < n (AVX2 masks are vectors: lane i's sign bit)
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, mask);
}
inline Vec LoadTail(const uint16_t* p, int64_t n) {  // no 16-bit masked load: through a zeroed copy
  uint16_t part[kLanes] = {};
  std::memcpy(part, p, size_t(n) * sizeof(uint16_t));
  return Load(part);
}

// out[i] = the sum of v[i]'s lanes, i < count <= 8.
inline void StoreSums8(const Vec* v, float* out, int count) {
  // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]: two rounds leave, per 128-bit half,
  // the 4-lane partial sums of four vectors; the halves of two such results add up to the 8 sums in order.
  const Vec abcd = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const Vec efgh = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  const Vec sums = _mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20), _mm256_permute2f128_ps(abcd, efgh, 0x31));
  if (count == 8) {
    _mm256_storeu_ps(out, sums);
  } else {
    float all[8];
    _mm256_storeu_ps(all, sums);
    std::memcpy(out, all, size_t(count) * sizeof(float));
  }
}

#endif

// out[t] = the sum of acc[t]'s lanes, t < C.
template <int C>
inline void StoreLaneSums(const Vec* acc, float* out) {
#pragma GCC unroll 8
  for (int g = 0; g < C; g += 8) {
    Vec group[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) group[i] = g + i < C ? acc[g + i] : Zero();
    StoreSums8(group, out + g, C - g < 8 ? C - g : 8);
  }
}

}  // namespace omni_jax::simd

#endif  // OMNI_JAX_KERNELS_SIMD_H_
