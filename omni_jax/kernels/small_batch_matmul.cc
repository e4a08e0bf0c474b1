// y[M, N] (float32) = x[M, K] . w[K, N] for a few rows (M <= 8): the decode-step projections on the CPU.
//
// XLA:CPU runs these products through a GEMM library whose small-M kernels leave this machine's memory
// bandwidth unused (f32 M=8: ~60% of it) and whose bfloat16 path reads the weight at 9-16 GB/s. Here every
// weight element is read once, streamed row by row, bfloat16 widened to float32 in registers, and all products
// accumulate in float32 (the `preferred_element_type=float32` contract of omni_jax.models.layers.Einsum).
//
// x and w share one dtype, float32 or bfloat16; both are row-major. The columns are cut into chunks that XLA's
// intra-op thread pool and the calling thread take from a shared counter.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kPanel = 32;     // output columns held in registers: 2 zmm per row
constexpr int64_t kRowBlock = 16;  // weight rows streamed together (16 sequential streams)
constexpr int64_t kPrefetchPanels = 16;  // software prefetch distance, in panels of the visiting order
constexpr int64_t kMaxChunk = 2048;  // columns per work item: y chunk <= 8 x 2048 x 4 B = 64 KB

inline __mmask16 Mask16(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

inline __m512 Load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

inline __m512 Load16(const uint16_t* p, __mmask16 mask) {  // bfloat16 -> float32: the high 16 bits
  __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Columns [c0, c1) of y for all M rows. x is float32 [M, K]. The weight is visited in blocks of kRowBlock rows;
// within a block, panel by panel along the rows (kRowBlock sequential streams).
template <int M, typename W>
void Chunk(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t c0, int64_t c1) {
  const int64_t panels = (c1 - c0 + kPanel - 1) / kPanel;
  for (int64_t k0 = 0; k0 < K; k0 += kRowBlock) {
    const int64_t k1 = std::min(K, k0 + kRowBlock);
    for (int64_t i = 0; i < panels; ++i) {
      const int64_t p = c0 + i * kPanel;
      const __mmask16 ma = Mask16(c1 - p), mb = Mask16(c1 - p - 16);
      // Software prefetch of the weight this row will need kPrefetchPanels panels later in the visiting order
      // (further along the row, or in the next row block for a narrow chunk): the hardware prefetchers lose
      // these page-crossing streams (measured: M=8 17.8 -> 35 GB/s).
      const int64_t ahead = i + kPrefetchPanels;
      const int64_t prefetch_offset = (ahead / panels) * kRowBlock * N + (ahead % panels - i) * kPanel;
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) {
        if (k0 == 0) {
          acc[m][0] = _mm512_setzero_ps();
          acc[m][1] = _mm512_setzero_ps();
        } else {
          acc[m][0] = _mm512_maskz_loadu_ps(ma, y + m * N + p);
          acc[m][1] = _mm512_maskz_loadu_ps(mb, y + m * N + p + 16);
        }
      }
      const W* wk = w + k0 * N + p;
      for (int64_t k = k0; k < k1; ++k, wk += N) {
        if (k + (ahead / panels) * kRowBlock < K) {
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

template <typename W>
using ChunkFn = void (*)(const float*, const W*, float*, int64_t, int64_t, int64_t, int64_t);

template <typename W>
ChunkFn<W> ChunkFor(int64_t rows) {
  switch (rows) {
    case 1: return Chunk<1, W>;
    case 2: return Chunk<2, W>;
    case 3: return Chunk<3, W>;
    case 4: return Chunk<4, W>;
    case 5: return Chunk<5, W>;
    case 6: return Chunk<6, W>;
    case 7: return Chunk<7, W>;
    default: return Chunk<8, W>;
  }
}

// Work shared by the calling thread and the pool's tasks: chunk i covers columns [i * width, (i+1) * width).
struct Work {
  std::vector<float> x;  // [M, K] float32
  const void* w;
  float* y;
  int64_t rows, K, N, width, chunks;
  bool bf16;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t i = next.fetch_add(1); i < chunks; i = next.fetch_add(1)) {
      const int64_t c0 = i * width, c1 = std::min(N, c0 + width);
      if (bf16) {
        ChunkFor<uint16_t>(rows)(x.data(), static_cast<const uint16_t*>(w), y, K, N, c0, c1);
      } else {
        ChunkFor<float>(rows)(x.data(), static_cast<const float*>(w), y, K, N, c0, c1);
      }
      done.fetch_add(1, std::memory_order_release);
    }
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
  work->x.resize(rows * K);
  if (bf16) {
    const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t i = 0; i < rows * K; ++i) {
      const uint32_t bits = uint32_t(xs[i]) << 16;
      std::memcpy(&work->x[i], &bits, sizeof(float));
    }
  } else {
    std::memcpy(work->x.data(), x.untyped_data(), rows * K * sizeof(float));
  }
  work->w = w.untyped_data();
  work->y = y->typed_data();
  work->rows = rows;
  work->K = K;
  work->N = N;
  work->bf16 = bf16;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~2 chunks per thread, a whole number of register panels each, at most kMaxChunk columns.
  const int64_t target = (N + 2 * threads - 1) / (2 * threads);
  work->width = std::min(kMaxChunk, std::max(kPanel, (target + kPanel - 1) / kPanel * kPanel));
  work->chunks = (N + work->width - 1) / work->width;
  const int64_t helpers = std::min(threads - 1, work->chunks - 1);  // the calling thread is one of the workers
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->chunks) {
    _mm_pause();
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
