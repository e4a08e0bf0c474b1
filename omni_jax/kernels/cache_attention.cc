// Decode-step attention products over one layer of the KV cache, read in place on the CPU.
//
//   scores[b, h, s] = q[b, h, :] . k[layer, b, s, h / G, :]        (CacheScores)
//   out[b, h, :]    = sum over s of p[b, h, s] * v[layer, b, s, h / G, :]   (CacheMix)
//
// The cache is the whole stacked [L, B, S, K, d] array (float32, or the uint16 bits of bfloat16: what
// omni_jax.models.kv_cache stores) and `layer` a scalar operand, so no layer slice is copied. XLA's dot wants the
// (b, kv-head) batch dims leading and copied every layer's cache into that layout at every step; a
// multiply-reduce form instead materialised a float32 copy of the layer. The softmax between the two products
// stays in XLA. q comes in the cache's element type. Sums are float32: bfloat16 scores use AVX512_BF16's pairwise
// dot product (exact products, the pair's sum rounded once), or widen to float32 where the CPU lacks it (or the
// kernel is compiled for AVX2, simd.h); the mix widens values (exactly) and multiplies by float32 probabilities.
//
// Only slots below the scalar operand `limit` are read: the caller passes one past the last slot any row may
// attend to, so the rest have probability exactly 0 (their scores are written as 0 and masked by the caller).
// Work items are (row b, a range of slots), taken from a shared counter by XLA's intra-op thread pool and the
// calling thread. With fewer rows than items wanted the slots are split into ranges, and the mix of each range is
// a partial sum added up at the end, in range order.
//
// Scores: a register tile of T slots x the G query heads of one kv head accumulates vector-lane partial products
// along d, summed once per tile (simd.h); a tile's kv heads are taken in turn, so an item reads its slots'
// [range, K, d] block in address order. Mix: slots in blocks of kMixBlock; each (kv head, column block) pass
// keeps G x W accumulators in registers and reads its part of every slot's row, the block staying in cache
// between passes while the next block is prefetched, a line or two per slot of a pass.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bf16_dot.h"
#include "pool_items.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace simd = omni_jax::simd;

namespace {

constexpr int64_t kMaxGroups = 8;       // query heads per kv head
constexpr int64_t kItemsPerThread = 4;  // items wanted per pool thread (load balance)
constexpr int64_t kMinRange = 64;       // slots of the shortest range a row is split into
constexpr int64_t kMixBlock = 64;       // slots per block of CacheMix (<= 64 KB of bf16 cache at K = 4, d = 128)

struct Shape {
  int64_t B, S, K, d, G, layer;
  // first element of cache[layer, b, s, kh, :]
  int64_t At(int64_t b, int64_t s, int64_t kh) const { return (((layer * B + b) * S + s) * K + kh) * d; }
};

// How one chunk of d is loaded and multiplied in the scores, per cache type and CPU.
struct FloatFma {  // float32 cache and q
  using Elem = float;
  using Chunk = simd::Vec;
  static constexpr int64_t kChunk = simd::kLanes;
  static Chunk Load(const float* p) { return simd::Load(p); }
  static simd::Vec Madd(simd::Vec acc, Chunk a, Chunk b) { return simd::Fmadd(a, b, acc); }
};

struct BfloatWidened : FloatFma {  // bfloat16 bits widened to float32 (exactly): CPUs without AVX512_BF16
  using Elem = uint16_t;
  static Chunk Load(const uint16_t* p) { return simd::Load(p); }
};

#if defined(__AVX512F__)
struct BfloatDot {  // bfloat16 bits, AVX512_BF16: 32 elements of d per instruction
  using Elem = uint16_t;
  using Chunk = __m512bh;
  static constexpr int64_t kChunk = 32;
  OMNI_JAX_TARGET static Chunk Load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  OMNI_JAX_TARGET static __m512 Madd(__m512 acc, Chunk a, Chunk b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

// Slots per scores tile for G query heads per kv head: G * T accumulators with T cache chunks and one q chunk in
// the vector registers (AVX-512: <= 24 accumulators of 32 registers; AVX2: G * T + T + 1 <= 16).
template <int G>
constexpr int ScoreSlots() {
  if constexpr (simd::kRegisters == 32) {
    return G <= 2 ? 8 : G == 3 ? 7 : G == 4 ? 6 : G <= 6 ? 4 : 3;
  } else {
    return G == 1 ? 7 : G == 2 ? 4 : G == 3 ? 3 : G <= 6 ? 2 : 1;
  }
}

// out[g * ld + t] = qg[g, :] . rows[t * stride :][:d] for g < G, t < T (qg: the G query heads of one kv head).
template <class Op, int G, int T>
OMNI_JAX_TARGET void ScoreTile(const typename Op::Elem* qg, const typename Op::Elem* rows, int64_t stride,
                               int64_t d, float* out, int64_t ld) {
  simd::Vec acc[G * T];
#pragma GCC unroll 32
  for (int i = 0; i < G * T; ++i) acc[i] = simd::Zero();
  for (int64_t j = 0; j < d; j += Op::kChunk) {
    typename Op::Chunk kv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) kv[t] = Op::Load(rows + t * stride + j);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      typename Op::Chunk qv = Op::Load(qg + g * d + j);
      asm("" : "+v"(qv));  // one load per chunk, kept in a register for the T products (not folded into each)
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[g * T + t] = Op::Madd(acc[g * T + t], qv, kv[t]);
    }
  }
  float sums[G * T];
  simd::StoreLaneSums<G * T>(acc, sums);
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) out[g * ld + t] = sums[g * T + t];
  }
}

// scores[b, :, s] for slots s in [s0, s1); q [B, H, d] and the cache in Op's element type, scores [B, H, S].
// Slots go in chunks of about 64: the tiles write a chunk's [H, chunk] scores to a local buffer, copied out row
// by row (tiles writing T floats to each of H rows of scores directly ran at about half the rate from memory).
template <class Op, int G>
OMNI_JAX_TARGET void ScoresRange(const void* q_data, const void* cache_data, float* scores, const Shape& sh,
                                 int64_t b, int64_t s0, int64_t s1) {
  using E = typename Op::Elem;
  constexpr int T = ScoreSlots<G>();
  constexpr int64_t kSlotsPerChunk = T * (64 / T);
  constexpr int64_t kAheadSlots = 16;  // prefetch distance of the scores tiles
  const E* q = static_cast<const E*>(q_data);
  const E* cache = static_cast<const E*>(cache_data);
  const int64_t H = sh.K * G, stride = sh.K * sh.d;
  const E* qb = q + b * H * sh.d;
  float* ob = scores + b * H * sh.S;
  thread_local std::vector<float> chunk_scores;
  if (int64_t(chunk_scores.size()) < H * kSlotsPerChunk) chunk_scores.resize(H * kSlotsPerChunk);
  float* buf = chunk_scores.data();  // [H, kSlotsPerChunk]
  for (int64_t c0 = s0; c0 < s1; c0 += kSlotsPerChunk) {
    const int64_t c1 = std::min(s1, c0 + kSlotsPerChunk);
    int64_t s = c0;
    for (; s + T <= c1; s += T) {
      if (s + kAheadSlots + T <= s1) {  // this tile's slots, kAheadSlots on: the cache lines of T whole slots
        const char* ahead = reinterpret_cast<const char*>(cache + sh.At(b, s + kAheadSlots, 0));
        for (int64_t o = 0; o < T * stride * int64_t(sizeof(E)); o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
      }
      for (int64_t kh = 0; kh < sh.K; ++kh) {
        ScoreTile<Op, G, T>(qb + kh * G * sh.d, cache + sh.At(b, s, kh), stride, sh.d,
                            buf + kh * G * kSlotsPerChunk + (s - c0), kSlotsPerChunk);
      }
    }
    for (; s < c1; ++s) {
      for (int64_t kh = 0; kh < sh.K; ++kh) {
        ScoreTile<Op, G, 1>(qb + kh * G * sh.d, cache + sh.At(b, s, kh), stride, sh.d,
                            buf + kh * G * kSlotsPerChunk + (s - c0), kSlotsPerChunk);
      }
    }
    for (int64_t h = 0; h < H; ++h) std::copy(buf + h * kSlotsPerChunk, buf + h * kSlotsPerChunk + (c1 - c0), ob + h * sh.S + c0);
  }
}

// Vectors of columns per pass of CacheMix: W per query head, G * W accumulators with W value chunks and one
// broadcast probability in the vector registers (AVX-512: <= 24 accumulators of 32; AVX2: G * W + W + 1 <= 16).
// kLanes * W divides d (a multiple of 64).
template <int G>
constexpr int MixWidth() {
  if constexpr (simd::kRegisters == 32) {
    return G <= 6 ? 4 : 2;
  } else {
    return G <= 2 ? 4 : G <= 6 ? 2 : 1;
  }
}

// Prefetches the lines of [next, end) a few at a time, spread over the passes of the block before them.
struct BlockPrefetch {
  const char* next;
  const char* end;
  int64_t per_step;  // lines per slot of a pass
  void Step() {
    for (int64_t i = 0; i < per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

// acc[g, :] += sum over s in [s0, s1) of pg[g * S + s] * v(s) for g < G, v(s) = rows[(s - s0) * stride :][:d]:
// one kv head's values over a block of slots; acc [G, d] float32 is loaded and stored once per column pass.
template <typename C, int G>
void MixBlock(const float* pg, int64_t S, const C* rows, int64_t stride, int64_t d, int64_t s0, int64_t s1,
              float* acc, BlockPrefetch& prefetch) {
  constexpr int W = MixWidth<G>();
  constexpr int64_t L = simd::kLanes;
  for (int64_t j0 = 0; j0 < d; j0 += L * W) {
    simd::Vec a[G][W];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 4
      for (int i = 0; i < W; ++i) a[g][i] = simd::Load(acc + g * d + j0 + L * i);
    }
    const C* row = rows + j0;
    BlockPrefetch ahead = prefetch;  // a local copy the loop keeps in registers
    for (int64_t s = s0; s < s1; ++s, row += stride) {
      ahead.Step();
      simd::Vec v[W];
#pragma GCC unroll 4
      for (int i = 0; i < W; ++i) v[i] = simd::Load(row + L * i);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const simd::Vec pv = simd::Set1(pg[g * S + s]);
#pragma GCC unroll 4
        for (int i = 0; i < W; ++i) a[g][i] = simd::Fmadd(pv, v[i], a[g][i]);
      }
    }
    prefetch = ahead;
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 4
      for (int i = 0; i < W; ++i) simd::Store(acc + g * d + j0 + L * i, a[g][i]);
    }
  }
}

// out [H, d] = sum over s in [s0, s1) of p[b, h, s] * v[layer, b, s, h / G, :]; p float32 [B, H, S].
template <typename C, int G>
void MixRange(const void* p_data, const void* cache_data, float* out, const Shape& sh, int64_t b, int64_t s0,
              int64_t s1) {
  constexpr int W = MixWidth<G>();
  const float* p = static_cast<const float*>(p_data);
  const C* cache = static_cast<const C*>(cache_data);
  const int64_t H = sh.K * G, stride = sh.K * sh.d;
  const int64_t steps_per_slot = sh.K * (sh.d / (simd::kLanes * W));  // passes over each slot of a block
  std::fill(out, out + H * sh.d, 0.0f);
  const float* pb = p + b * H * sh.S;
  for (int64_t block = s0; block < s1; block += kMixBlock) {
    const int64_t end = std::min(s1, block + kMixBlock), next_end = std::min(s1, end + kMixBlock);
    const char* next = reinterpret_cast<const char*>(cache + sh.At(b, end, 0));
    const int64_t lines = (next_end - end) * stride * int64_t(sizeof(C)) / 64;
    BlockPrefetch prefetch{next, next + lines * 64, (lines + (end - block) * steps_per_slot - 1) /
                                                        ((end - block) * steps_per_slot)};
    for (int64_t kh = 0; kh < sh.K; ++kh) {
      MixBlock<C, G>(pb + kh * G * sh.S, sh.S, cache + sh.At(b, block, kh), stride, sh.d, block, end,
                     out + kh * G * sh.d, prefetch);
    }
  }
}

using RangeFn = void (*)(const void*, const void*, float*, const Shape&, int64_t, int64_t, int64_t);

// The range function for 1 <= groups <= kMaxGroups query heads per kv head.
template <class Op>
RangeFn ScoresFor(int64_t groups) {
  static constexpr RangeFn kFns[kMaxGroups] = {ScoresRange<Op, 1>, ScoresRange<Op, 2>, ScoresRange<Op, 3>,
                                               ScoresRange<Op, 4>, ScoresRange<Op, 5>, ScoresRange<Op, 6>,
                                               ScoresRange<Op, 7>, ScoresRange<Op, 8>};
  return kFns[groups - 1];
}

template <typename C>
RangeFn MixFor(int64_t groups) {
  static constexpr RangeFn kFns[kMaxGroups] = {MixRange<C, 1>, MixRange<C, 2>, MixRange<C, 3>, MixRange<C, 4>,
                                               MixRange<C, 5>, MixRange<C, 6>, MixRange<C, 7>, MixRange<C, 8>};
  return kFns[groups - 1];
}

// Both handlers: check the operands, pick the range function, run (b, slot range) items on the pool.
// a: q [B, H, d] in the cache's element type (scores) or p [B, H, S] float32 (mix); cache [L, B, S, K, d] float32
// or uint16 (bfloat16 bits); layer and limit: int32 scalars.
template <bool kScores>
ffi::Error CacheAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer cache,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> limit,
                              ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto cd = cache.dimensions(), ad = a.dimensions();
  if (cd.size() != 5 || ad.size() != 3) {
    return ffi::Error::InvalidArgument("cache attention: expected a [B, H, *] operand and a [L, B, S, K, d] cache");
  }
  Shape sh{cd[1], cd[2], cd[3], cd[4], 0, 0};
  const int64_t H = ad[1];
  if (ad[0] != sh.B || H % sh.K != 0 || H / sh.K > kMaxGroups || ad[2] != (kScores ? sh.d : sh.S) ||
      sh.d % 64 != 0) {
    return ffi::Error::InvalidArgument("cache attention: operand shapes do not match the cache (or unsupported)");
  }
  sh.G = H / sh.K;
  sh.layer = layer.typed_data()[0];
  if (sh.layer < 0 || sh.layer >= cd[0]) return ffi::Error::InvalidArgument("cache attention: layer out of range");
  const bool f32 = cache.element_type() == ffi::DataType::F32;
  if (!f32 && cache.element_type() != ffi::DataType::U16) {
    return ffi::Error::InvalidArgument("cache attention: the cache must be float32 or uint16 (bfloat16 bits)");
  }
  if (a.element_type() != (kScores ? cache.element_type() : ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("cache attention: q must have the cache's element type, p float32");
  }
  RangeFn range;
  if (kScores) {
    range = f32 ? ScoresFor<FloatFma>(sh.G) : ScoresFor<BfloatWidened>(sh.G);
#if defined(__AVX512F__)
    if (!f32 && omni_jax::HasBf16Dot()) range = ScoresFor<BfloatDot>(sh.G);
#endif
  } else {
    range = f32 ? MixFor<float>(sh.G) : MixFor<uint16_t>(sh.G);
  }
  const int64_t slots = std::clamp<int64_t>(limit.typed_data()[0], 0, sh.S);  // slots read: [0, slots)
  const void* in = a.untyped_data();
  const void* data = cache.untyped_data();
  float* result = out->typed_data();
  const int64_t row = H * (kScores ? sh.S : sh.d);  // output floats per b
  if (slots == 0) {
    std::fill(result, result + sh.B * row, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t wanted = std::max<int64_t>(1, std::min((slots + kMinRange - 1) / kMinRange,  // ranges per row
                                                        (threads * kItemsPerThread + sh.B - 1) / sh.B));
  const int64_t per = (slots + wanted - 1) / wanted;
  const int64_t ranges = (slots + per - 1) / per;
  if (kScores) {
    if (slots < sh.S) {  // unread slots: 0, masked by the caller
      for (int64_t bh = 0; bh < sh.B * H; ++bh) std::fill(result + bh * sh.S + slots, result + (bh + 1) * sh.S, 0.0f);
    }
    omni_jax::RunOnPool(pool, sh.B * ranges, [=](int64_t i) {
      const int64_t s0 = (i % ranges) * per;
      range(in, data, result, sh, i / ranges, s0, std::min(slots, s0 + per));
    });
  } else if (ranges == 1) {
    omni_jax::RunOnPool(pool, sh.B, [=](int64_t b) { range(in, data, result + b * row, sh, b, 0, slots); });
  } else {  // partial sums per range, then added in range order
    std::vector<float> partial(sh.B * ranges * row);
    float* parts = partial.data();
    omni_jax::RunOnPool(pool, sh.B * ranges, [=](int64_t i) {
      const int64_t s0 = (i % ranges) * per;
      range(in, data, parts + i * row, sh, i / ranges, s0, std::min(slots, s0 + per));
    });
    for (int64_t b = 0; b < sh.B; ++b) {
      float* dst = result + b * row;
      std::copy(parts + b * ranges * row, parts + (b * ranges + 1) * row, dst);
      for (int64_t r = 1; r < ranges; ++r) {
        const float* src = parts + (b * ranges + r) * row;
        for (int64_t j = 0; j < row; ++j) dst[j] += src[j];
      }
    }
  }
  return ffi::Error::Success();
}

// (q or p, cache, layer, limit) -> float32, on XLA's intra-op pool.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxCacheScores, CacheAttentionImpl<true>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxCacheMix, CacheAttentionImpl<false>, Binding());
