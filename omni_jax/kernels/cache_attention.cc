// Decode-step attention products over one layer of the KV cache, read in place on the CPU.
//
//   scores[b, h, s] = q[b, h, :] . k[layer, b, s, h / G, :]        (CacheScores)
//   out[b, h, :]    = sum over s of p[b, h, s] * v[layer, b, s, h / G, :]   (CacheMix)
//
// The cache is the whole stacked [L, B, S, K, d] array (float32, or the uint16 bits of bfloat16: what
// omni_jax.models.kv_cache stores) and `layer` a scalar operand, so no layer slice is copied. XLA's dot wants the
// (b, kv-head) batch dims leading and copied every layer's cache into that layout at every step; a
// multiply-reduce form instead materialised a float32 copy of the layer. The softmax between the two products
// stays in XLA. Products are float32 (bfloat16 widened exactly), sums float32. Work items are (b, kv head) pairs
// taken from a shared counter by XLA's intra-op thread pool and the calling thread.
#include <immintrin.h>

#include <cstdint>

#include "pool_items.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxGroups = 8;  // query heads per kv head
constexpr int64_t kBlock = 64;     // head-dim block of CacheMix's accumulators (4 zmm per query head)

inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 Load16(const uint16_t* p) {  // bfloat16 bits -> float32 (exact)
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

struct Shape {
  int64_t B, S, K, d, G, layer;
  // first element of cache[layer, b, s, kh, :]
  int64_t At(int64_t b, int64_t s, int64_t kh) const { return (((layer * B + b) * S + s) * K + kh) * d; }
};

// scores[b, kh * G + g, s] for all slots s; q: float32 [B, H, d].
template <typename C, int G>
void ScoresItem(const float* q, const void* cache_data, float* scores, const Shape& sh, int64_t b, int64_t kh) {
  const C* cache = static_cast<const C*>(cache_data);
  const int64_t H = sh.K * G;
  const float* qb = q + (b * H + kh * G) * sh.d;
  float* out = scores + (b * H + kh * G) * sh.S;
  for (int64_t s = 0; s < sh.S; ++s) {
    const C* ks = cache + sh.At(b, s, kh);
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t j = 0; j < sh.d; j += 16) {
      const __m512 kv = Load16(ks + j);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qb + g * sh.d + j), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) out[g * sh.S + s] = _mm512_reduce_add_ps(acc[g]);
  }
}

// out[b, kh * G + g, :] = sum_s p[b, kh * G + g, s] * v[s, :]; p: float32 [B, H, S].
template <typename C, int G>
void MixItem(const float* p, const void* cache_data, float* out, const Shape& sh, int64_t b, int64_t kh) {
  const C* cache = static_cast<const C*>(cache_data);
  const int64_t H = sh.K * G;
  const float* pb = p + (b * H + kh * G) * sh.S;
  float* ob = out + (b * H + kh * G) * sh.d;
  for (int64_t j0 = 0; j0 < sh.d; j0 += kBlock) {
    __m512 acc[G][4];
    for (int g = 0; g < G; ++g) {
      for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < sh.S; ++s) {
      const C* vs = cache + sh.At(b, s, kh) + j0;
      const __m512 v0 = Load16(vs), v1 = Load16(vs + 16), v2 = Load16(vs + 32), v3 = Load16(vs + 48);
      for (int g = 0; g < G; ++g) {
        const __m512 pg = _mm512_set1_ps(pb[g * sh.S + s]);
        acc[g][0] = _mm512_fmadd_ps(pg, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(pg, v1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(pg, v2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(pg, v3, acc[g][3]);
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(ob + g * sh.d + j0 + 16 * i, acc[g][i]);
    }
  }
}

using ItemFn = void (*)(const float*, const void*, float*, const Shape&, int64_t, int64_t);

// The item function for a cache element type C and 1 <= groups <= kMaxGroups query heads per kv head.
template <typename C>
ItemFn ItemFor(bool scores, int64_t groups) {
  static constexpr ItemFn kScores[kMaxGroups] = {ScoresItem<C, 1>, ScoresItem<C, 2>, ScoresItem<C, 3>,
                                                 ScoresItem<C, 4>, ScoresItem<C, 5>, ScoresItem<C, 6>,
                                                 ScoresItem<C, 7>, ScoresItem<C, 8>};
  static constexpr ItemFn kMix[kMaxGroups] = {MixItem<C, 1>, MixItem<C, 2>, MixItem<C, 3>, MixItem<C, 4>,
                                              MixItem<C, 5>, MixItem<C, 6>, MixItem<C, 7>, MixItem<C, 8>};
  return (scores ? kScores : kMix)[groups - 1];
}

// Both handlers: check the operands, pick the item function, run one item per (b, kv head) on the pool.
// a: q [B, H, d] (kScores) or p [B, H, S] (mix), float32; cache [L, B, S, K, d] float32 or uint16 (bfloat16 bits).
template <bool kScores>
ffi::Error CacheAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::AnyBuffer cache,
                              ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto cd = cache.dimensions(), ad = a.dimensions();
  if (cd.size() != 5 || ad.size() != 3) {
    return ffi::Error::InvalidArgument("cache attention: expected a [B, H, *] operand and a [L, B, S, K, d] cache");
  }
  Shape sh{cd[1], cd[2], cd[3], cd[4], 0, 0};
  const int64_t H = ad[1];
  if (ad[0] != sh.B || H % sh.K != 0 || H / sh.K > kMaxGroups || ad[2] != (kScores ? sh.d : sh.S) ||
      sh.d % kBlock != 0) {
    return ffi::Error::InvalidArgument("cache attention: operand shapes do not match the cache (or unsupported)");
  }
  sh.G = H / sh.K;
  sh.layer = layer.typed_data()[0];
  if (sh.layer < 0 || sh.layer >= cd[0]) return ffi::Error::InvalidArgument("cache attention: layer out of range");
  const bool f32 = cache.element_type() == ffi::DataType::F32;
  if (!f32 && cache.element_type() != ffi::DataType::U16) {
    return ffi::Error::InvalidArgument("cache attention: the cache must be float32 or uint16 (bfloat16 bits)");
  }
  const ItemFn item = f32 ? ItemFor<float>(kScores, sh.G) : ItemFor<uint16_t>(kScores, sh.G);
  const float* in = a.typed_data();
  const void* data = cache.untyped_data();
  float* result = out->typed_data();
  omni_jax::RunOnPool(pool, sh.B * sh.K,
                      [=](int64_t i) { item(in, data, result, sh, i / sh.K, i % sh.K); });
  return ffi::Error::Success();
}

// (q or p, cache, layer) -> float32, on XLA's intra-op pool.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxCacheScores, CacheAttentionImpl<true>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxCacheMix, CacheAttentionImpl<false>, Binding());
