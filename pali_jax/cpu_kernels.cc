// Matrix-vector products for decoding on x86-64 CPUs, called from XLA programs as FFI custom calls
// (pali_jax/cpu_kernels.py registers them; pali_jax/backend.py decides when they run).
//
// Decoding multiplies a few activation rows by every weight of the model once per token, so its
// speed is the rate at which the weights stream from memory. XLA:CPU's bf16 product (YNNPACK)
// runs at a fraction of that rate for a few rows, and it cannot multiply an int8 weight without
// first writing it out in float. These kernels read each weight from memory once, straight from
// its stored form (again from cache for each further block of rows), and keep the activation rows
// in registers and L1:
//
//   pj_bf16_matvec:  x bf16 [M, K], w bf16 [N, K]                -> y f32 [M, N]
//   pj_quant_matvec: x f32 [M, K],  w int8 [N, K], s f32 [N, G]  -> y f32 [M, N]
//   pj_int4_matvec:  x bf16 [M, K], w u8 [N, K / 2], s f32 [N, G] -> y f32 [M, N]  (nibble-packed)
//
// y[m, n] = sum_k x[m, k] w[n, k] (times s[n, g] per group of K / G contracted inputs). Weights
// are output axes first ([N, K], the inference layout of pali_jax.backend), so each output is one
// contiguous dot product. bf16 products are exact in float32 and accumulated in float32
// (VDPBF16PS); int8 / int4 values (int4 held one per byte) are converted to float32 exactly and
// accumulated in float32, each group's sum scaled once; packed int4 values are looked up as bf16
// (exact) and multiplied like bf16 weights. Output channels are split across XLA's intra-op threads.
//
// Each kernel is compiled for its instruction set with a target attribute, so the library builds
// and loads on any x86-64 CPU; pali_jax/backend.py calls a kernel only where the CPU has it
// (bf16: AVX512-BF16; quant: AVX-512 F + BW).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define PJ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define PJ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
// The loops over a block's channels and rows, fully unrolled, so that its accumulators stay in
// registers (left to itself GCC 12 keeps them in a stack array, stored on every step).
#define PJ_UNROLL _Pragma("GCC unroll 16")

// Output channels handled together: their weight rows share each load of the activations. A single
// activation row leaves registers for twice as many in the quantised kernel (more loads in flight).
constexpr int64_t kRowsPerBlock = 4;
constexpr int64_t kQuantRowsOneRow = 8;

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0;
  std::mutex mu;
  std::condition_variable finished;
};

// Runs body(chunk) for every chunk in [0, chunks) on this thread and the pool's others. The caller
// takes chunks too, so the call finishes even if no pool thread is free; a helper that starts late
// finds nothing left (the shared state outlives the call for it).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, Body body) {
  auto progress = std::make_shared<Progress>();
  progress->chunks = chunks;
  auto work = [progress, body]() {
    for (int64_t c; (c = progress->next.fetch_add(1)) < progress->chunks;) {
      body(c);
      if (progress->done.fetch_add(1) + 1 == progress->chunks) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->finished.wait(lock, [&] { return progress->done.load() == progress->chunks; });
}

// Output channels per chunk: enough chunks to balance the threads, each long enough to stream.
int64_t ChunkRows(int64_t n, int64_t threads) {
  int64_t rows = n / std::max<int64_t>(1, 8 * threads);
  rows = std::max<int64_t>(kQuantRowsOneRow, rows / kQuantRowsOneRow * kQuantRowsOneRow);
  return std::min<int64_t>(rows, 256);
}

// ---- bf16 ----------------------------------------------------------------------------------------

PJ_BF16 inline __m512bh LoadBf16(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// Rows [n0, n0 + R) of w times rows [m0, m0 + MB) of x.
template <int R, int MB>
PJ_BF16 void Bf16Block(const uint16_t* x, const uint16_t* w, float* y, int64_t m0, int64_t n0, int64_t N,
                       int64_t K) {
  __m512 acc[R][MB];
  PJ_UNROLL for (int r = 0; r < R; ++r)
    PJ_UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512bh xv[MB];
    PJ_UNROLL for (int m = 0; m < MB; ++m) xv[m] = LoadBf16(x + (m0 + m) * K + k, mask);
    PJ_UNROLL for (int r = 0; r < R; ++r) {
      const __m512bh wv = LoadBf16(w + (n0 + r) * K + k, mask);
      PJ_UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  PJ_UNROLL for (int r = 0; r < R; ++r)
    PJ_UNROLL for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// Blocks of 4 rows (16 accumulators), each block reading the channels' weight rows again from
// cache: faster than one pass over 2 channels x all rows, which keeps as many accumulators but
// loads twice the activations per weight load (benchmarks/cpu_matmul.py, `kernel` at 8 rows).
template <int R>
PJ_BF16 void Bf16Rows(const uint16_t* x, const uint16_t* w, float* y, int64_t M, int64_t n0, int64_t N, int64_t K) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) Bf16Block<R, 4>(x, w, y, m, n0, N, K);
  for (; m < M; ++m) Bf16Block<R, 1>(x, w, y, m, n0, N, K);
}

ffi::Error Bf16Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("pj_bf16_matvec: expected x [M, K] and w [N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  const int64_t per = ChunkRows(N, pool.num_threads());
  ParallelFor(pool, (N + per - 1) / per, [=](int64_t c) {
    const int64_t n1 = std::min(N, (c + 1) * per);
    int64_t n = c * per;
    for (; n + kRowsPerBlock <= n1; n += kRowsPerBlock) Bf16Rows<kRowsPerBlock>(xp, wp, yp, M, n, N, K);
    for (; n < n1; ++n) Bf16Rows<1>(xp, wp, yp, M, n, N, K);
  });
  return ffi::Error::Success();
}

// ---- int8 / int4 (one value per byte), scaled per group --------------------------------------

PJ_AVX512 inline __m512 LoadInt8AsFloat(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// Rows [n0, n0 + R) of w times rows [m0, m0 + MB) of x; s [N, G], groups of `group` inputs.
template <int R, int MB>
PJ_AVX512 void QuantBlock(const float* x, const int8_t* w, const float* s, float* y, int64_t m0, int64_t n0,
                          int64_t N, int64_t K, int64_t G) {
  const int64_t group = K / G;
  __m512 total[R][MB];
  PJ_UNROLL for (int r = 0; r < R; ++r)
    PJ_UNROLL for (int m = 0; m < MB; ++m) total[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[R][MB];
    PJ_UNROLL for (int r = 0; r < R; ++r)
      PJ_UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * group;
    for (int64_t k = g * group; k < end; k += 16) {
      const __mmask16 mask = end - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - k)) - 1);
      if ((k & 63) == 0)  // the next block's rows, a cache line ahead of their loads
        PJ_UNROLL for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + R + r) * K + k), _MM_HINT_T0);
      __m512 xv[MB];
      PJ_UNROLL for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + (m0 + m) * K + k);
      PJ_UNROLL for (int r = 0; r < R; ++r) {
        const __m512 wv = LoadInt8AsFloat(w + (n0 + r) * K + k, mask);
        PJ_UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    PJ_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(s[(n0 + r) * G + g]);
      PJ_UNROLL for (int m = 0; m < MB; ++m) total[r][m] = _mm512_fmadd_ps(acc[r][m], scale, total[r][m]);
    }
  }
  PJ_UNROLL for (int r = 0; r < R; ++r)
    PJ_UNROLL for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(total[r][m]);
}

template <int R>
PJ_AVX512 void QuantRows(const float* x, const int8_t* w, const float* s, float* y, int64_t M, int64_t n0, int64_t N,
                         int64_t K, int64_t G) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) QuantBlock<R, 2>(x, w, s, y, m, n0, N, K, G);
  for (; m < M; ++m) QuantBlock<R, 1>(x, w, s, y, m, n0, N, K, G);
}

ffi::Error QuantMatvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != wd[1] || sd[0] != wd[0] || sd[1] < 1 ||
      wd[1] % sd[1] != 0)
    return ffi::Error::InvalidArgument("pj_quant_matvec: expected x [M, K], w [N, K] and s [N, G], G dividing K");
  const int64_t M = xd[0], K = xd[1], N = wd[0], G = sd[1];
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = s.typed_data();
  float* yp = y->typed_data();
  const int64_t per = ChunkRows(N, pool.num_threads());  // a multiple of both block sizes
  ParallelFor(pool, (N + per - 1) / per, [=](int64_t c) {
    const int64_t n1 = std::min(N, (c + 1) * per);
    int64_t n = c * per;
    if (M == 1)
      for (; n + kQuantRowsOneRow <= n1; n += kQuantRowsOneRow) QuantBlock<kQuantRowsOneRow, 1>(xp, wp, sp, yp, 0, n, N, K, G);
    for (; n + kRowsPerBlock <= n1; n += kRowsPerBlock) QuantRows<kRowsPerBlock>(xp, wp, sp, yp, M, n, N, K, G);
    for (; n < n1; ++n) QuantRows<1>(xp, wp, sp, yp, M, n, N, K, G);
  });
  return ffi::Error::Success();
}

// ---- int4, two values per byte, scaled per group ---------------------------------------------
//
// w [N, K / 2] bytes: in each chunk of 128 contracted inputs, 16-bit word j holds inputs j, 32 + j,
// 64 + j and 96 + j in its four nibbles, low to high, each as value + 8 (pali_jax/quantize.py,
// `pack_int4`). A table lookup (VPERMW, which reads an index's low 5 bits: the table repeats at
// 16, so the nibble above is ignored) turns each nibble into one of the bf16 values -8..7, exact,
// and the four nibble streams multiply four contiguous runs of 32 bf16 inputs (VDPBF16PS: exact
// products, float32 sums). Half int8's bytes and, per weight, fewer instructions.

PJ_BF16 inline __m512i Int4Table() {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) {
    const float value = static_cast<float>(i % 16 - 8);
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    table[i] = static_cast<uint16_t>(bits >> 16);  // exact: at most 4 significant bits
  }
  return _mm512_load_si512(table);
}

// Rows [n0, n0 + R) of w times rows [m0, m0 + MB) of x; s [N, G], groups of `group` inputs.
template <int R, int MB>
PJ_BF16 void Int4Block(const uint16_t* x, const uint8_t* w, const float* s, float* y, int64_t m0, int64_t n0,
                       int64_t N, int64_t K, int64_t G, __m512i table) {
  const int64_t group = K / G, half = K / 2;
  __m512 total[R][MB];
  PJ_UNROLL for (int r = 0; r < R; ++r)
    PJ_UNROLL for (int m = 0; m < MB; ++m) total[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[R][MB];
    PJ_UNROLL for (int r = 0; r < R; ++r)
      PJ_UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 128) {
      PJ_UNROLL for (int r = 0; r < R; ++r) {
        const uint8_t* wr = w + (n0 + r) * half + k / 2;
        _mm_prefetch(reinterpret_cast<const char*>(wr + R * half), _MM_HINT_T0);  // the next block's row
        const __m512i words = _mm512_loadu_si512(wr);
        __m512bh v[4];
        v[0] = (__m512bh)_mm512_permutexvar_epi16(words, table);
        v[1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
        v[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 8), table);
        v[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 12), table);
        PJ_UNROLL for (int m = 0; m < MB; ++m) {
          const uint16_t* row = x + (m0 + m) * K + k;
          PJ_UNROLL for (int q = 0; q < 4; ++q)
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], v[q], (__m512bh)_mm512_loadu_si512(row + 32 * q));
        }
      }
    }
    PJ_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(s[(n0 + r) * G + g]);
      PJ_UNROLL for (int m = 0; m < MB; ++m) total[r][m] = _mm512_fmadd_ps(acc[r][m], scale, total[r][m]);
    }
  }
  PJ_UNROLL for (int r = 0; r < R; ++r)
    PJ_UNROLL for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(total[r][m]);
}

// Output channels [n0, n1) for MB rows from m0, R channels at a time (the last n1 - n0 % R one by one).
template <int R, int MB>
PJ_BF16 void Int4Channels(const uint16_t* x, const uint8_t* w, const float* s, float* y, int64_t m0, int64_t n0,
                          int64_t n1, int64_t N, int64_t K, int64_t G, __m512i table) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) Int4Block<R, MB>(x, w, s, y, m0, n, N, K, G, table);
  for (; n < n1; ++n) Int4Block<1, MB>(x, w, s, y, m0, n, N, K, G, table);
}

// Blocks of 8 rows, one channel at a time (each weight row converted once per 8 rows); fewer rows
// take several channels at once, so that a block keeps 8 to 16 accumulators.
PJ_BF16 void Int4Rows(const uint16_t* x, const uint8_t* w, const float* s, float* y, int64_t M, int64_t n0, int64_t n1,
                      int64_t N, int64_t K, int64_t G) {
  const __m512i table = Int4Table();
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) Int4Channels<1, 8>(x, w, s, y, m, n0, n1, N, K, G, table);
  switch (M - m) {
    case 7: return Int4Channels<1, 7>(x, w, s, y, m, n0, n1, N, K, G, table);
    case 6: return Int4Channels<1, 6>(x, w, s, y, m, n0, n1, N, K, G, table);
    case 5: return Int4Channels<1, 5>(x, w, s, y, m, n0, n1, N, K, G, table);
    case 4: return Int4Channels<2, 4>(x, w, s, y, m, n0, n1, N, K, G, table);
    case 3: return Int4Channels<2, 3>(x, w, s, y, m, n0, n1, N, K, G, table);
    case 2: return Int4Channels<4, 2>(x, w, s, y, m, n0, n1, N, K, G, table);
    case 1: return Int4Channels<8, 1>(x, w, s, y, m, n0, n1, N, K, G, table);
    default: return;
  }
}

ffi::Error Int4Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> w,
                      ffi::Buffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != 2 * wd[1] || sd[0] != wd[0] || sd[1] < 1 ||
      xd[1] % (128 * sd[1]) != 0)
    return ffi::Error::InvalidArgument(
        "pj_int4_matvec: expected x [M, K], w [N, K / 2] and s [N, G], groups of K / G a multiple of 128");
  const int64_t M = xd[0], K = xd[1], N = wd[0], G = sd[1];
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  const uint8_t* wp = w.typed_data();
  const float* sp = s.typed_data();
  float* yp = y->typed_data();
  const int64_t per = ChunkRows(N, pool.num_threads());  // a multiple of every block's channels
  ParallelFor(pool, (N + per - 1) / per, [=](int64_t c) {
    Int4Rows(xp, wp, sp, yp, M, c * per, std::min(N, (c + 1) * per), N, K, G);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjBf16Matvec, Bf16Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjQuantMatvec, QuantMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjInt4Matvec, Int4Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
