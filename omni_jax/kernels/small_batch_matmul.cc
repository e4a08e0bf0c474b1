// y[M, N] (float32) = x[M, K] . w[N, K]^T for a few rows (M <= 8): the decode-step projections on the CPU.
//
// The weight is in the decode layout ([out, in], omni_jax.models.decode_layout): every output is a dot product of
// two contiguous rows, x[m, :] and w[n, :]. A register tile of B weight rows x M input rows accumulates
// vector-lane partial sums along K with no shuffles in the loop (bfloat16: AVX512_BF16's pairwise dot product, 32
// elements of K per instruction; float32: FMA, 16 with AVX-512 and 8 with AVX2, simd.h), and sums the lanes once
// per tile. (The [in, out] layout needs a broadcast of x per row and interleaving weight rows into pairs: at 8 rows
// that loop was bound by those shuffles, 48 GB/s of weight from L2 against 88 here.)
//
// XLA:CPU runs these products through a GEMM library whose small-M kernels leave this machine's memory bandwidth
// unused, and whose bfloat16 path reads the weight at 9-16 GB/s. Here each weight element is read once, all
// products accumulate in float32 (the `preferred_element_type=float32` contract of omni_jax.models.layers.Einsum),
// and the weight's rows are cut into contiguous items that XLA's intra-op thread pool and the calling thread take
// from a shared counter. bfloat16 without AVX512_BF16 (or compiled for AVX2) widens the weight to float32 in
// registers.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_dot.h"
#include "pool_items.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace simd = omni_jax::simd;

// Every function below may inline the bfloat16 dot product, so all carry its target (bf16_dot.h); only BfloatDot
// emits it, and only on CPUs that have it (omni_jax::HasBf16Dot).

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kItemsPerThread = 4;  // items per pool thread (load balance; each item is a contiguous region)

// Weight rows per register tile for M input rows: B * M accumulators, the other registers hold weight chunks and
// one x chunk. AVX-512 (32 registers): at most 24 accumulators; a single row reads 8 weight rows at a time, from
// DRAM 8-15% faster than 16 (more streams than the prefetchers follow well) and as fast as 6 or 12. AVX2 (16):
// B * M + B + 1 <= 16, except for a single row, whose weight chunks are each used once and need not stay in a
// register (8 rows: as fast as 6, ahead of 4 and 2 on Zen 3).
template <int M>
constexpr int TileRows() {
  if constexpr (simd::kRegisters == 32) {
    return M <= 3 ? 8 : M == 4 ? 6 : M <= 6 ? 4 : 3;
  } else {
    return M == 1 ? 8 : M == 2 ? 4 : M == 3 ? 3 : M <= 6 ? 2 : 1;
  }
}

// How one chunk of K is loaded and multiplied, per dtype path.
#if defined(__AVX512F__)
struct BfloatDot {  // bfloat16 weight and input, AVX512_BF16: 32 elements of K per instruction
  using Weight = uint16_t;
  using Input = uint16_t;
  using Chunk = __m512bh;
  static constexpr int64_t kChunk = 32;
  OMNI_JAX_TARGET static Chunk LoadWeight(const Weight* p) { return (__m512bh)_mm512_loadu_si512(p); }
  OMNI_JAX_TARGET static Chunk LoadWeight(const Weight* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(__mmask32((1ull << n) - 1), p);
  }
  OMNI_JAX_TARGET static Chunk LoadInput(const Input* p) { return LoadWeight(p); }
  OMNI_JAX_TARGET static Chunk LoadInput(const Input* p, int64_t n) { return LoadWeight(p, n); }
  OMNI_JAX_TARGET static __m512 Madd(__m512 acc, Chunk w, Chunk x) { return _mm512_dpbf16_ps(acc, w, x); }
};
#endif

struct FloatFma {  // float32 weight and input
  using Weight = float;
  using Input = float;
  using Chunk = simd::Vec;
  static constexpr int64_t kChunk = simd::kLanes;
  static Chunk LoadWeight(const Weight* p) { return simd::Load(p); }
  static Chunk LoadWeight(const Weight* p, int64_t n) { return simd::LoadTail(p, n); }
  static Chunk LoadInput(const Input* p) { return simd::Load(p); }
  static Chunk LoadInput(const Input* p, int64_t n) { return simd::LoadTail(p, n); }
  static simd::Vec Madd(simd::Vec acc, Chunk w, Chunk x) { return simd::Fmadd(w, x, acc); }
};

struct BfloatWidened : FloatFma {  // bfloat16 weight widened in registers (no AVX512_BF16); x widened beforehand
  using Weight = uint16_t;
  static Chunk LoadWeight(const Weight* p) { return simd::Load(p); }
  static Chunk LoadWeight(const Weight* p, int64_t n) { return simd::LoadTail(p, n); }
};

// yt[j * M + m] = x[m, :] . w[j, :] for the B weight rows at w (row stride K). `next`, if set, is the next tile's
// first weight row: its lines are prefetched at the pace this tile reads its own (the hardware prefetchers alone
// leave 8-row tiles ~20% short of the memory rate: they run few streams, with long compute between lines).
template <class Op, int M, int B>
OMNI_JAX_TARGET void DotTile(const typename Op::Input* x, const typename Op::Weight* w, int64_t K, float* yt,
                             const typename Op::Weight* next) {
  constexpr int64_t C = Op::kChunk;
  // one prefetch a cache line (AVX2's bfloat16 chunk is 16 bytes: one per chunk read 8 rows 4-5% slower)
  constexpr int64_t kChunksPerLine = std::max<int64_t>(1, 64 / (C * int64_t(sizeof(typename Op::Weight))));
  simd::Vec acc[B * M];
#pragma GCC unroll 32
  for (int t = 0; t < B * M; ++t) acc[t] = simd::Zero();
  int64_t k = 0;
  for (; k + C <= K; k += C) {
    typename Op::Chunk wv[B];
#pragma GCC unroll 16
    for (int j = 0; j < B; ++j) {
      wv[j] = Op::LoadWeight(w + j * K + k);
      if (next != nullptr && (k / C) % kChunksPerLine == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T0);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const typename Op::Chunk xv = Op::LoadInput(x + m * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < B; ++j) acc[j * M + m] = Op::Madd(acc[j * M + m], wv[j], xv);
    }
  }
  if (k < K) {  // the last K % C elements: masked loads, zeros beyond
    const int64_t left = K - k;
    typename Op::Chunk wv[B];
#pragma GCC unroll 16
    for (int j = 0; j < B; ++j) wv[j] = Op::LoadWeight(w + j * K + k, left);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const typename Op::Chunk xv = Op::LoadInput(x + m * K + k, left);
#pragma GCC unroll 16
      for (int j = 0; j < B; ++j) acc[j * M + m] = Op::Madd(acc[j * M + m], wv[j], xv);
    }
  }
  simd::StoreLaneSums<B * M>(acc, yt);
}

// yt[n * M + m] = x[m, :] . w[n, :] for the `rows` weight rows at w: whole tiles, then single rows.
template <class Op, int M>
OMNI_JAX_TARGET void DotRows(const typename Op::Input* x, const typename Op::Weight* w, int64_t K, int64_t rows,
                             float* yt) {
  constexpr int64_t B = TileRows<M>();
  int64_t n = 0;
  for (; n + B <= rows; n += B) {  // a single row's streams the hardware prefetchers follow alone
    const typename Op::Weight* next = M > 1 && n + 2 * B <= rows ? w + (n + B) * K : nullptr;
    DotTile<Op, M, B>(x, w + n * K, K, yt + n * M, next);
  }
  for (; n < rows; ++n) DotTile<Op, M, 1>(x, w + n * K, K, yt + n * M, nullptr);
}

template <class Op>
using DotRowsFn = void (*)(const typename Op::Input*, const typename Op::Weight*, int64_t, int64_t, float*);

template <class Op>
DotRowsFn<Op> DotRowsFor(int64_t rows) {
  switch (rows) {
    case 1: return DotRows<Op, 1>;
    case 2: return DotRows<Op, 2>;
    case 3: return DotRows<Op, 3>;
    case 4: return DotRows<Op, 4>;
    case 5: return DotRows<Op, 5>;
    case 6: return DotRows<Op, 6>;
    case 7: return DotRows<Op, 7>;
    default: return DotRows<Op, 8>;
  }
}

int64_t TileRowsFor(int64_t rows) {
  switch (rows) {
    case 1: return TileRows<1>();
    case 2: return TileRows<2>();
    case 3: return TileRows<3>();
    case 4: return TileRows<4>();
    case 5: return TileRows<5>();
    case 6: return TileRows<6>();
    case 7: return TileRows<7>();
    default: return TileRows<8>();
  }
}

// A float32 buffer of at least `floats` this thread keeps across calls (an item's outputs in [n, m] order).
float* ScratchTile(size_t floats) {
  thread_local std::vector<float> tile;
  if (tile.size() < floats) tile.resize(floats);
  return tile.data();
}

// Runs y = x . w^T with item i taking weight rows [i * per, (i + 1) * per): a contiguous region of the weight.
template <class Op>
void Run(ffi::ThreadPool& pool, const typename Op::Input* x, const typename Op::Weight* w, float* y, int64_t M,
         int64_t K, int64_t N) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tile = TileRowsFor(M);
  const int64_t per = std::max<int64_t>(tile, ((N + threads * kItemsPerThread - 1) / (threads * kItemsPerThread) +
                                               tile - 1) / tile * tile);
  const DotRowsFn<Op> dot_rows = DotRowsFor<Op>(M);
  omni_jax::RunOnPool(pool, (N + per - 1) / per, [=](int64_t i) {
    const int64_t n0 = i * per, rows = std::min(N, n0 + per) - n0;
    if (M == 1) {  // [n, m] order is y's own
      dot_rows(x, w + n0 * K, K, rows, y + n0);
      return;
    }
    float* yt = ScratchTile(rows * M);
    dot_rows(x, w + n0 * K, K, rows, yt);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < rows; ++n) y[m * N + n0 + n] = yt[n * M + m];
    }
  });
}

ffi::Error SmallBatchMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                                ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("small_batch_matmul: expected x [M, K] and w [N, K]");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (M < 1 || M > kMaxRows) return ffi::Error::InvalidArgument("small_batch_matmul: 1 <= M <= 8 rows");
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  if (x.element_type() != w.element_type() || (!bf16 && x.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("small_batch_matmul: x and w must both be float32 or both bfloat16");
  }
  float* out = y->typed_data();
  if (!bf16) {
    Run<FloatFma>(pool, static_cast<const float*>(x.untyped_data()), static_cast<const float*>(w.untyped_data()),
                  out, M, K, N);
#if defined(__AVX512F__)
  } else if (omni_jax::HasBf16Dot()) {
    Run<BfloatDot>(pool, static_cast<const uint16_t*>(x.untyped_data()),
                   static_cast<const uint16_t*>(w.untyped_data()), out, M, K, N);
#endif
  } else {  // x widened once here; the weight is widened in registers as it streams
    std::vector<float> widened(M * K);
    const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t i = 0; i < M * K; ++i) {
      const uint32_t bits = uint32_t(xs[i]) << 16;
      std::memcpy(&widened[i], &bits, sizeof(float));
    }
    Run<BfloatWidened>(pool, widened.data(), static_cast<const uint16_t*>(w.untyped_data()), out, M, K, N);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxSmallBatchMatmul, SmallBatchMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
