// y[M, N] (float32) = x[M, K] . w[K, N] for a few rows (M <= 8): the decode-step projections on the CPU.
//
// XLA:CPU runs these products through a GEMM library whose small-M kernels leave this machine's memory
// bandwidth unused (f32 M=8: ~60% of it) and whose bfloat16 path reads the weight at 9-16 GB/s. Here every
// weight element is read once, streamed row by row, bfloat16 multiplied with AVX512_BF16's dot product where the
// CPU has it (TileDot) or widened to float32 in registers (Tile), and all products accumulate in float32 (the
// `preferred_element_type=float32` contract of omni_jax.models.layers.Einsum).
//
// x and w share one dtype, float32 or bfloat16; both are row-major. The weight is cut into row slices and column
// chunks (`Work`) that XLA's intra-op thread pool and the calling thread take from a shared counter.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "pool_items.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kPanel = 32;          // output columns held in registers: 2 zmm per row
constexpr int64_t kRowBlock = 8;        // weight rows streamed together (8 sequential streams)
constexpr int64_t kPrefetchPanels = 16;  // software prefetch distance, in panels of the visiting order
constexpr int64_t kTileBytes = 512 * 1024;  // a work item's float32 output tile [M, width] stays in L2

inline __mmask16 Mask16(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

inline __m512 Load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

inline __m512 Load16(const uint16_t* p, __mmask16 mask) {  // bfloat16 -> float32: the high 16 bits
  __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Panel i of a tile's columns [c0, c1) (panels of kPanel columns): its first column, the store masks of its two
// 16-column halves, and where to prefetch. Software prefetch reaches the weight a row will need kPrefetchPanels
// panels later in the visiting order (further along the row, or in a later row block for a narrow tile): the
// hardware prefetchers lose these streams when several run at once (measured: M=8 17.8 -> 35 GB/s).
struct Panel {
  int64_t p;                // first column
  __mmask16 ma, mb;         // columns p..p+15, p+16..p+31 inside the tile
  int64_t blocks_ahead;     // row blocks between this panel and the prefetched one
  int64_t prefetch_offset;  // elements from the current weight row to the prefetched address

  Panel(int64_t c0, int64_t c1, int64_t i, int64_t panels, int64_t N)
      : p(c0 + i * kPanel), ma(Mask16(c1 - p)), mb(Mask16(c1 - p - 16)) {
    const int64_t ahead = i + kPrefetchPanels;
    blocks_ahead = ahead / panels;
    prefetch_offset = blocks_ahead * kRowBlock * N + (ahead % panels - i) * kPanel;
  }
};

// y[m, c] = sum over k in [k_begin, k_end) of x[m, k] * w[k, c], for c in [c0, c1). x: float32 [M, K];
// w: [K, N]; y: float32 with row stride N. The rows are visited in blocks of kRowBlock; within a block, panel by
// panel along the rows (kRowBlock sequential streams through adjacent memory).
template <int M, typename W>
void Tile(const float* x, int64_t K, const W* w, int64_t N, float* y, int64_t k_begin, int64_t k_end,
          int64_t c0, int64_t c1) {
  const int64_t panels = (c1 - c0 + kPanel - 1) / kPanel;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kRowBlock) {
    const int64_t k1 = std::min(k_end, k0 + kRowBlock);
    for (int64_t i = 0; i < panels; ++i) {
      const Panel panel(c0, c1, i, panels, N);
      const int64_t p = panel.p, blocks_ahead = panel.blocks_ahead, prefetch_offset = panel.prefetch_offset;
      const __mmask16 ma = panel.ma, mb = panel.mb;
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) {
        if (k0 == k_begin) {
          acc[m][0] = _mm512_setzero_ps();
          acc[m][1] = _mm512_setzero_ps();
        } else {
          acc[m][0] = _mm512_maskz_loadu_ps(ma, y + m * N + p);
          acc[m][1] = _mm512_maskz_loadu_ps(mb, y + m * N + p + 16);
        }
      }
      const W* wk = w + k0 * N + p;
      for (int64_t k = k0; k < k1; ++k, wk += N) {
        if (k + blocks_ahead * kRowBlock < k_end) {
          _mm_prefetch(reinterpret_cast<const char*>(wk + prefetch_offset), _MM_HINT_T0);
          if (sizeof(W) == 4) _mm_prefetch(reinterpret_cast<const char*>(wk + prefetch_offset + 16), _MM_HINT_T0);
        }
        const __m512 a = Load16(wk, ma), b = Load16(wk + 16, mb);
        for (int m = 0; m < M; ++m) {
          const __m512 xv = _mm512_set1_ps(x[m * K + k]);
          acc[m][0] = _mm512_fmadd_ps(xv, a, acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(xv, b, acc[m][1]);
        }
      }
      for (int m = 0; m < M; ++m) {
        _mm512_mask_storeu_ps(y + m * N + p, ma, acc[m][0]);
        _mm512_mask_storeu_ps(y + m * N + p + 16, mb, acc[m][1]);
      }
    }
  }
}

// A float32 buffer of at least `floats` this thread keeps across calls (a work item's accumulators).
float* ScratchTile(size_t floats) {
  thread_local std::vector<float> tile;
  if (tile.size() < floats) tile.resize(floats);
  return tile.data();
}

// The same product for a bfloat16 weight and input with AVX512_BF16's dot product: each instruction multiplies
// a pair of weight rows by a pair of x values and adds both products to a float32 lane (half the multiply-add
// instructions of widening to float32; at M = 8 the widening path is bound by them, not by memory). The two
// rows' panels are interleaved in registers (vpunpck{l,h}wd), so the accumulators hold the panel's 32 columns in
// the order {0-3, 8-11, 16-19, 24-27} | {4-7, 12-15, ...}. Between row blocks they stay in that order in a
// per-thread scratch tile; y gets them in column order once, at the end. (Permuting them to and from y at every
// row block took as many shuffle slots as the dot products at M = 8: from L2, 8-row products ran at 36 GB/s of
// weight, 47 without the permutes.)
// x: the bfloat16 input, row m at x + m * x_stride, x_stride even and a zero after a row of odd length, so that
// the pair x[m, k], x[m, k + 1] (k even) is one 32-bit broadcast; k_begin is even. bfloat16 denormals count as
// zero (the instruction's DAZ).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void TileDot(const uint16_t* x, int64_t x_stride,
                                                                     const uint16_t* w, int64_t N, float* y,
                                                                     int64_t k_begin, int64_t k_end, int64_t c0,
                                                                     int64_t c1) {
  const __m512i from_a = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i from_b = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const int64_t panels = (c1 - c0 + kPanel - 1) / kPanel;
  float* const scratch = ScratchTile(panels * M * kPanel);  // [panels, M, kPanel] in the interleave's order
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kRowBlock) {
    const int64_t k1 = std::min(k_end, k0 + kRowBlock);
    for (int64_t i = 0; i < panels; ++i) {
      const Panel panel(c0, c1, i, panels, N);
      const int64_t p = panel.p, blocks_ahead = panel.blocks_ahead, prefetch_offset = panel.prefetch_offset;
      const __mmask32 mw = __mmask32(panel.ma) | (__mmask32(panel.mb) << 16);  // the panel's 32 weight columns
      float* const tile = scratch + i * M * kPanel;
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) {
        acc[m][0] = k0 == k_begin ? _mm512_setzero_ps() : _mm512_loadu_ps(tile + m * kPanel);
        acc[m][1] = k0 == k_begin ? _mm512_setzero_ps() : _mm512_loadu_ps(tile + m * kPanel + 16);
      }
      const uint16_t* wk = w + k0 * N + p;
      for (int64_t k = k0; k < k1; k += 2, wk += 2 * N) {
        const bool pair = k + 1 < k1;
        if (k + blocks_ahead * kRowBlock < k_end) {
          _mm_prefetch(reinterpret_cast<const char*>(wk + prefetch_offset), _MM_HINT_T0);
          if (pair) _mm_prefetch(reinterpret_cast<const char*>(wk + N + prefetch_offset), _MM_HINT_T0);
        }
        const __m512i ra = _mm512_maskz_loadu_epi16(mw, wk);
        const __m512i rb = pair ? _mm512_maskz_loadu_epi16(mw, wk + N) : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(ra, rb), hi = (__m512bh)_mm512_unpackhi_epi16(ra, rb);
        for (int m = 0; m < M; ++m) {
          int32_t pair_bits;
          std::memcpy(&pair_bits, x + m * x_stride + k, sizeof(pair_bits));
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair_bits);
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], lo, xv);
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], hi, xv);
        }
      }
      for (int m = 0; m < M; ++m) {
        _mm512_storeu_ps(tile + m * kPanel, acc[m][0]);
        _mm512_storeu_ps(tile + m * kPanel + 16, acc[m][1]);
      }
    }
  }
  for (int64_t i = 0; i < panels; ++i) {  // to column order, into y
    const int64_t p = c0 + i * kPanel;
    const __mmask16 ma = Mask16(c1 - p), mb = Mask16(c1 - p - 16);
    const float* tile = scratch + i * M * kPanel;
    for (int m = 0; m < M; ++m) {
      const __m512 a = _mm512_loadu_ps(tile + m * kPanel), b = _mm512_loadu_ps(tile + m * kPanel + 16);
      _mm512_mask_storeu_ps(y + m * N + p, ma, _mm512_permutex2var_ps(a, from_a, b));
      _mm512_mask_storeu_ps(y + m * N + p + 16, mb, _mm512_permutex2var_ps(a, from_b, b));
    }
  }
}

using TileDotFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, int64_t, int64_t,
                           int64_t);

TileDotFn TileDotFor(int64_t rows) {
  switch (rows) {
    case 1: return TileDot<1>;
    case 2: return TileDot<2>;
    case 3: return TileDot<3>;
    case 4: return TileDot<4>;
    case 5: return TileDot<5>;
    case 6: return TileDot<6>;
    case 7: return TileDot<7>;
    default: return TileDot<8>;
  }
}

// Whether this CPU has AVX512_BF16 (checked once).
bool HasBf16Dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, float*, int64_t, int64_t, int64_t, int64_t);

template <typename W>
TileFn<W> TileFor(int64_t rows) {
  switch (rows) {
    case 1: return Tile<1, W>;
    case 2: return Tile<2, W>;
    case 3: return Tile<3, W>;
    case 4: return Tile<4, W>;
    case 5: return Tile<5, W>;
    case 6: return Tile<6, W>;
    case 7: return Tile<7, W>;
    default: return Tile<8, W>;
  }
}

// One call's work, run as items on the pool (omni_jax::RunOnPool). The weight's rows are cut into `slices`
// contiguous slices (one per thread: each streams its own region of memory) and its columns into `chunks` of
// `width`; item i = (chunk i / slices, slice i % slices) sums its slice's rows into that slice's output (y itself
// for slice 0, a partial buffer otherwise). Whoever finishes a chunk's last slice adds the partials into y.
struct Work {
  const float* x;  // [M, K] float32: the input itself, or `x_widened` for bfloat16
  std::vector<float> x_widened;
  const uint16_t* x_bf16;  // the bfloat16 input for TileDot, rows x_stride apart (dot-product path)
  int64_t x_stride;
  bool dot;  // bfloat16 on a CPU with AVX512_BF16: TileDot
  const void* w;
  float* y;
  float* partial;  // [slices - 1, M, N]
  int64_t rows, K, N, width, chunks, slices, slice_rows;
  bool bf16;
  std::unique_ptr<std::atomic<int64_t>[]> slices_done;  // per chunk

  float* Out(int64_t slice) { return slice == 0 ? y : partial + (slice - 1) * rows * N; }

  void Reduce(int64_t c0, int64_t c1) {
    for (int64_t s = 1; s < slices; ++s) {
      const float* part = Out(s);
      for (int64_t m = 0; m < rows; ++m) {
        for (int64_t c = c0; c < c1; ++c) y[m * N + c] += part[m * N + c];
      }
    }
  }

  void Item(int64_t i) {
    const int64_t chunk = i / slices, slice = i % slices;
    const int64_t c0 = chunk * width, c1 = std::min(N, c0 + width);
    const int64_t k0 = slice * slice_rows, k1 = std::min(K, k0 + slice_rows);
    if (dot) {
      TileDotFor(rows)(x_bf16, x_stride, static_cast<const uint16_t*>(w), N, Out(slice), k0, k1, c0, c1);
    } else if (bf16) {
      TileFor<uint16_t>(rows)(x, K, static_cast<const uint16_t*>(w), N, Out(slice), k0, k1, c0, c1);
    } else {
      TileFor<float>(rows)(x, K, static_cast<const float*>(w), N, Out(slice), k0, k1, c0, c1);
    }
    if (slices_done[chunk].fetch_add(1, std::memory_order_acq_rel) == slices - 1) Reduce(c0, c1);
  }
};

ffi::Error SmallBatchMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                                ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("small_batch_matmul: expected x [M, K] and w [K, N]");
  }
  const int64_t rows = xd[0], K = xd[1], N = wd[1];
  if (rows < 1 || rows > kMaxRows) {
    return ffi::Error::InvalidArgument("small_batch_matmul: 1 <= M <= 8 rows");
  }
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  if (x.element_type() != w.element_type() || (!bf16 && x.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("small_batch_matmul: x and w must both be float32 or both bfloat16");
  }
  auto work = std::make_shared<Work>();
  work->dot = bf16 && HasBf16Dot();
  if (work->dot) {
    work->x_bf16 = static_cast<const uint16_t*>(x.untyped_data());
    work->x_stride = K;
    if (K % 2 == 1) {  // rows padded with a zero to even length, in a buffer this thread keeps across calls
      thread_local std::vector<uint16_t> padded;
      padded.assign(rows * (K + 1), 0);
      for (int64_t m = 0; m < rows; ++m) {
        std::memcpy(&padded[m * (K + 1)], work->x_bf16 + m * K, K * sizeof(uint16_t));
      }
      work->x_bf16 = padded.data();
      work->x_stride = K + 1;
    }
  }
  if (bf16 && !work->dot) {  // widened once here; the weight is widened in registers as it streams
    work->x_widened.resize(rows * K);
    const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t i = 0; i < rows * K; ++i) {
      const uint32_t bits = uint32_t(xs[i]) << 16;
      std::memcpy(&work->x_widened[i], &bits, sizeof(float));
    }
    work->x = work->x_widened.data();
  } else {
    work->x = static_cast<const float*>(x.untyped_data());
  }
  work->w = w.untyped_data();
  work->y = y->typed_data();
  work->rows = rows;
  work->K = K;
  work->N = N;
  work->bf16 = bf16;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Slices of whole row blocks (TileDot reads x in pairs from an even first row), none of them empty.
  const int64_t slices = std::max<int64_t>(1, std::min(threads, K / kRowBlock));
  work->slice_rows = ((K + slices - 1) / slices + kRowBlock - 1) / kRowBlock * kRowBlock;
  work->slices = (K + work->slice_rows - 1) / work->slice_rows;
  const int64_t max_width = std::max<int64_t>(kPanel, kTileBytes / (4 * rows) / kPanel * kPanel);
  work->width = std::min(N, max_width);
  work->chunks = (N + work->width - 1) / work->width;
  work->slices_done.reset(new std::atomic<int64_t>[work->chunks]);
  for (int64_t c = 0; c < work->chunks; ++c) work->slices_done[c].store(0, std::memory_order_relaxed);
  // Partial sums of slices 1.. live in a buffer this thread keeps across calls (no page faults per call); the
  // call returns only after every item that wrote to it has finished.
  thread_local std::vector<float> partial;
  partial.resize(std::max<size_t>(partial.size(), (work->slices - 1) * rows * N));
  work->partial = partial.data();
  omni_jax::RunOnPool(pool, work->chunks * work->slices, [work](int64_t i) { work->Item(i); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmniJaxSmallBatchMatmul, SmallBatchMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
