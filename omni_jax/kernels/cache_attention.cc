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

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

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
template <int G, typename C>
void ScoresItem(const float* q, const C* cache, float* scores, const Shape& sh, int64_t b, int64_t kh) {
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
template <int G, typename C>
void MixItem(const float* p, const C* cache, float* out, const Shape& sh, int64_t b, int64_t kh) {
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

template <template <int, typename> class Kind, typename C>
struct Bind {
  template <int G>
  static void Run(const float* a, const void* cache, float* out, const Shape& sh, int64_t b, int64_t kh) {
    Kind<G, C>::Run(a, static_cast<const C*>(cache), out, sh, b, kh);
  }
  static ItemFn For(int64_t groups) {
    switch (groups) {
      case 1: return Run<1>;
      case 2: return Run<2>;
      case 3: return Run<3>;
      case 4: return Run<4>;
      case 5: return Run<5>;
      case 6: return Run<6>;
      case 7: return Run<7>;
      default: return Run<8>;
    }
  }
};

template <int G, typename C>
struct Scores {
  static void Run(const float* q, const C* cache, float* out, const Shape& sh, int64_t b, int64_t kh) {
    ScoresItem<G, C>(q, cache, out, sh, b, kh);
  }
};

template <int G, typename C>
struct Mix {
  static void Run(const float* p, const C* cache, float* out, const Shape& sh, int64_t b, int64_t kh) {
    MixItem<G, C>(p, cache, out, sh, b, kh);
  }
};

struct Work {
  ItemFn fn;
  const float* a;
  const void* cache;
  float* out;
  Shape sh;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    const int64_t items = sh.B * sh.K;
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      fn(a, cache, out, sh, i / sh.K, i % sh.K);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Shared by both handlers: check the operands, pick the item function, run the items on the pool.
// a: q [B, H, d] (scores) or p [B, H, S] (mix), float32; cache [L, B, S, K, d] float32 or uint16 (bfloat16 bits).
ffi::Error Run(bool scores, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::AnyBuffer cache,
               ffi::Buffer<ffi::S32> layer, float* out) {
  const auto cd = cache.dimensions(), ad = a.dimensions();
  if (cd.size() != 5 || ad.size() != 3) {
    return ffi::Error::InvalidArgument("cache attention: expected a [B, H, *] operand and a [L, B, S, K, d] cache");
  }
  Shape sh{cd[1], cd[2], cd[3], cd[4], 0, 0};
  const int64_t H = ad[1];
  if (ad[0] != sh.B || H % sh.K != 0 || H / sh.K > kMaxGroups || ad[2] != (scores ? sh.d : sh.S) ||
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
  auto work = std::make_shared<Work>();
  if (scores) {
    work->fn = f32 ? Bind<Scores, float>::For(sh.G) : Bind<Scores, uint16_t>::For(sh.G);
  } else {
    work->fn = f32 ? Bind<Mix, float>::For(sh.G) : Bind<Mix, uint16_t>::For(sh.G);
  }
  work->a = a.typed_data();
  work->cache = cache.untyped_data();
  work->out = out;
  work->sh = sh;
  const int64_t items = sh.B * sh.K;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()) - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < items) _mm_pause();
  return ffi::Error::Success();
}

ffi::Error CacheScoresImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer cache,
                           ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  return Run(true, pool, q, cache, layer, out->typed_data());
}

ffi::Error CacheMixImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::AnyBuffer cache,
                        ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  return Run(false, pool, p, cache, layer, out->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxCacheScores, CacheScoresImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxCacheMix, CacheMixImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
