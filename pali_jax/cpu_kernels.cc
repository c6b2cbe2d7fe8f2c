// Matrix-vector products for decoding on x86-64 CPUs, and a prefill's products on AMX (at the end
// of this file), called from XLA programs as FFI custom calls (pali_jax/cpu_kernels.py registers
// them; pali_jax/backend.py decides when they run).
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
// (bf16: AVX512-BF16; quant: AVX-512 F + BW; the GEMMs: AMX-BF16, granted to the process).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

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


// ---- bf16 and int8 matrix products on AMX (from a few rows) --------------------------------------
//
// AMX multiplies bf16 many times faster than AVX-512, and reads a weight at the memory's rate from
// two rows on (a batch's decoding, a prefill). XLA's YNNPACK reaches AMX only with platform-dependent
// math, and only for plain dots: not for int8 weights, nor a product a few rows wide. TDPBF16PS multiplies a tile
// A [16 rows, 32 bf16] by a tile B [16 bf16 pairs, 16 columns] whose 32-bit elements each hold two
// consecutive contracted inputs, accumulating into C [16, 16] float32 (bf16 products exact, float32
// sums). Taking the weight as A (rows: output channels, its stored [N, K] rows) reads it in place;
// the activations, packed once per call into B tiles, are the small operand. So C is y transposed:
// C[n, m]. Each block of 2 x 2 tiles (32 channels x 32 rows) accumulates over a chunk of kAmxKc
// contracted inputs; its partial sums wait in a per-chunk buffer between chunks (the chunk's A
// tiles stay in L1 across all rows, the packed activations of a chunk in L2), and the last chunk's
// tiles are transposed into y. An int8 weight (per-channel scale) is converted to bf16 exactly,
// a block of channels at a time, and its scale applied to the float32 sums.

#define PJ_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

constexpr int64_t kTile = 16;        // rows of a tile; 16-bit pairs (or float32) per tile row
constexpr int64_t kTileK = 32;       // bf16 contracted inputs per tile row (64 bytes)
constexpr int64_t kAmxKc = 512;      // contracted inputs per chunk
constexpr int64_t kAmxChannels = 128;  // output channels per parallel chunk

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (2 x 2), 4-5: A (weights), 6-7: B (activations); all 16 rows of 64 bytes.
PJ_AMX void ConfigureTiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// rows[i] (16 32-bit elements each) <- its transpose.
PJ_AVX512 void Transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Rows [m0, m0 + 16) of x [M, K] (zero past M) packed as B tiles, one per 32 contracted inputs
// (zero past K): xp[kt] [16 pairs, 16 rows] of 32-bit pairs.
PJ_AVX512 void PackRowTiles(const uint16_t* x, int64_t M, int64_t K, int64_t m0, uint32_t* xp) {
  const int64_t tiles = (K + kTileK - 1) / kTileK;
  for (int64_t kt = 0; kt < tiles; ++kt) {
    const int64_t pairs = std::min<int64_t>(kTile, (K - kt * kTileK) / 2);
    const __mmask16 mask = pairs == kTile ? __mmask16(0xFFFF) : __mmask16((1u << pairs) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = m0 + i < M ? _mm512_maskz_loadu_epi32(mask, x + (m0 + i) * K + kt * kTileK) : _mm512_setzero_si512();
    Transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(xp + kt * 256 + i * 16, r[i]);
  }
}

// Output channels [n, n + 16 NT) times rows [m, m + 16 MT), over `steps` tiles of contracted
// inputs: a, the weight's rows (a_row elements apart) from the chunk's first input; b, the rows'
// first packed tile (b_next elements to the next 16 rows'). c: the block's four C tiles, its partial
// sums in (unless first) and out.
template <int NT, int MT>
PJ_AMX void AmxBlock(const uint16_t* a, int64_t a_row, const uint32_t* b, int64_t b_next, int64_t steps, float* c,
                     bool first) {
  if (first) {
    _tile_zero(0);
    if constexpr (MT > 1) _tile_zero(1);
    if constexpr (NT > 1) _tile_zero(2);
    if constexpr (NT > 1 && MT > 1) _tile_zero(3);
  } else {
    _tile_loadd(0, c, 64);
    if constexpr (MT > 1) _tile_loadd(1, c + 256, 64);
    if constexpr (NT > 1) _tile_loadd(2, c + 512, 64);
    if constexpr (NT > 1 && MT > 1) _tile_loadd(3, c + 768, 64);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * kTileK, a_row * 2);
    if constexpr (NT > 1) _tile_loadd(5, a + kTile * a_row + s * kTileK, a_row * 2);
    _tile_loadd(6, b + s * 256, 64);
    if constexpr (MT > 1) _tile_loadd(7, b + b_next + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NT > 1 && MT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  if constexpr (MT > 1) _tile_stored(1, c + 256, 64);
  if constexpr (NT > 1) _tile_stored(2, c + 512, 64);
  if constexpr (NT > 1 && MT > 1) _tile_stored(3, c + 768, 64);
}

// One C tile c [16 channels from n, 16 rows from m] written into y [M, N] (float32, or bf16 rounded
// to nearest even once, as XLA converts) transposed (rows past M dropped), times the channels'
// scales where s is given.
template <typename O>
PJ_AMX void WriteTile(const float* c, const float* s, O* y, int64_t M, int64_t N, int64_t n, int64_t m) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + i * 16);
  Transpose16(r);
  const __m512 scale = s ? _mm512_loadu_ps(s + n) : _mm512_set1_ps(1.0f);
  for (int i = 0; i < 16 && m + i < M; ++i) {
    const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(r[i]), scale);
    if constexpr (sizeof(O) == 4)
      _mm512_storeu_ps(y + (m + i) * N + n, v);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m + i) * N + n), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// rows [n, n + rows) of w [N, K] (bf16, or int8 converted exactly), inputs [k0, k0 + width)
// (zero past K) -> a [rows, width] bf16.
template <typename W>
PJ_AMX void CopyWeights(const W* w, int64_t K, int64_t n, int64_t rows, int64_t k0, int64_t width, uint16_t* a) {
  for (int64_t r = 0; r < rows; ++r) {
    const W* src = w + (n + r) * K;
    for (int64_t k = 0; k < width; k += 32) {
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(32, K - k0 - k));
      const __mmask32 mask = valid == 32 ? ~__mmask32(0) : (__mmask32(1) << valid) - 1;
      __m512i v;
      if constexpr (sizeof(W) == 1) {
        const __m256i bytes = _mm256_maskz_loadu_epi8(mask, src + k0 + k);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
        v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      } else {
        v = _mm512_maskz_loadu_epi16(mask, src + k0 + k);
      }
      _mm512_storeu_si512(a + r * width + k, v);
    }
  }
}

// Rows [n, n + rows) of w [N, K], inputs [k0, min(K, k0 + width)), fetched into L2 ahead of their use.
template <typename W>
inline void PrefetchWeights(const W* w, int64_t K, int64_t n, int64_t rows, int64_t k0, int64_t width) {
  const int64_t end = std::min(K, k0 + width);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = k0; k < end; k += 64 / sizeof(W))
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * K + k), _MM_HINT_T1);
}

// Rows of x per pass: their packed tiles are kept for the pass (in L2 a chunk at a time), and
// every weight is read once per pass.
constexpr int64_t kAmxRowsPerPass = 512;

template <typename W, typename O>
PJ_AMX void AmxChannels(const uint32_t* xp, const W* w, const float* s, O* y, int64_t M, int64_t m0,
                        int64_t rows, int64_t N, int64_t K, int64_t n0, int64_t n1, float* partial, uint16_t* abuf) {
  const int64_t k_tiles = (K + kTileK - 1) / kTileK, m_tiles = (rows + kTile - 1) / kTile;
  const int64_t m_pairs = (m_tiles + 1) / 2, chunk_tiles = kAmxKc / kTileK;
  const int64_t b_next = k_tiles * 256;
  // A bf16 weight whose rows hold whole tiles is read in place; others are copied (converted, padded).
  const bool copies = sizeof(W) == 1 || K % kTileK != 0;
  ConfigureTiles();
  for (int64_t kt0 = 0; kt0 < k_tiles; kt0 += chunk_tiles) {
    const int64_t steps = std::min(chunk_tiles, k_tiles - kt0);
    const bool first = kt0 == 0, last = kt0 + steps == k_tiles;
    for (int64_t n = n0; n < n1; n += 2 * kTile) {
      const int64_t nt = std::min<int64_t>(2, (n1 - n) / kTile);
      // A copied block's successor streams in while this one multiplies: the copy would otherwise
      // wait on memory with AMX idle (tile loads straight from the weight overlap with the products).
      if (copies && n + 2 * kTile < n1)
        PrefetchWeights(w, K, n + 2 * kTile, std::min<int64_t>(2 * kTile, n1 - n - 2 * kTile), kt0 * kTileK, steps * kTileK);
      else if (copies && !last)
        PrefetchWeights(w, K, n0, std::min<int64_t>(2 * kTile, n1 - n0), (kt0 + steps) * kTileK, chunk_tiles * kTileK);
      const uint16_t* a = abuf;
      int64_t a_row = steps * kTileK;
      if (!copies) {
        a = reinterpret_cast<const uint16_t*>(w) + n * K + kt0 * kTileK;
        a_row = K;
      } else {
        CopyWeights(w, K, n, nt * kTile, kt0 * kTileK, steps * kTileK, abuf);
      }
      for (int64_t mp = 0; mp < m_pairs; ++mp) {
        const int64_t mt = std::min<int64_t>(2, m_tiles - 2 * mp);
        const uint32_t* b = xp + (2 * mp * k_tiles + kt0) * 256;
        float* c = partial + (((n - n0) / (2 * kTile)) * m_pairs + mp) * 1024;
        if (nt == 2 && mt == 2) AmxBlock<2, 2>(a, a_row, b, b_next, steps, c, first);
        else if (nt == 2) AmxBlock<2, 1>(a, a_row, b, b_next, steps, c, first);
        else if (mt == 2) AmxBlock<1, 2>(a, a_row, b, b_next, steps, c, first);
        else AmxBlock<1, 1>(a, a_row, b, b_next, steps, c, first);
        if (last)
          for (int i = 0; i < nt; ++i)
            for (int j = 0; j < mt; ++j)
              WriteTile(c + (2 * i + j) * 256, s, y, M, N, n + i * kTile, m0 + 2 * mp * kTile + j * kTile);
      }
    }
  }
  _tile_release();
}

// Linux lets a process use AMX's tile registers only once it has asked (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); the grant covers every thread. Asked once; false on a CPU or kernel without AMX.
bool AmxGranted() {
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

template <typename W, typename O>
ffi::Error AmxProduct(ffi::ThreadPool& pool, const uint16_t* x, const W* w, const float* s, O* y, int64_t M,
                      int64_t N, int64_t K) {
  if (!AmxGranted()) return ffi::Error(ffi::ErrorCode::kUnavailable, "AMX is not available to this process");
  const int64_t k_tiles = (K + kTileK - 1) / kTileK;
  thread_local std::vector<uint32_t> packed;
  for (int64_t m0 = 0; m0 < M; m0 += kAmxRowsPerPass) {
    const int64_t rows = std::min(kAmxRowsPerPass, M - m0), m_tiles = (rows + kTile - 1) / kTile;
    packed.resize(m_tiles * k_tiles * 256);
    uint32_t* xp = packed.data();
    ParallelFor(pool, m_tiles, [=](int64_t t) {
      PackRowTiles(x + m0 * K, rows, K, t * kTile, xp + t * k_tiles * 256);
    });
    const int64_t chunks = (N + kAmxChannels - 1) / kAmxChannels;
    ParallelFor(pool, chunks, [=](int64_t ch) {
      thread_local std::vector<float> partial;
      thread_local std::vector<uint16_t> abuf;
      partial.resize(kAmxChannels / (2 * kTile) * ((m_tiles + 1) / 2) * 1024);
      abuf.resize(2 * kTile * kAmxKc);
      AmxChannels(xp, w, s, y, M, m0, rows, N, K, ch * kAmxChannels, std::min(N, (ch + 1) * kAmxChannels),
                  partial.data(), abuf.data());
    });
  }
  return ffi::Error::Success();
}

// y float32, or bf16 (the sums rounded once: what the model keeps, at half the bytes written).
template <typename W>
ffi::Error AmxInto(ffi::ThreadPool& pool, const uint16_t* x, const W* w, const float* s, ffi::AnyBuffer y,
                   int64_t M, int64_t N, int64_t K) {
  if (y.element_type() == ffi::DataType::BF16)
    return AmxProduct(pool, x, w, s, static_cast<uint16_t*>(y.untyped_data()), M, N, K);
  if (y.element_type() == ffi::DataType::F32)
    return AmxProduct(pool, x, w, s, static_cast<float*>(y.untyped_data()), M, N, K);
  return ffi::Error::InvalidArgument("the AMX products write float32 or bf16");
}

ffi::Error Bf16Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || wd[0] % kTile != 0 || xd[1] % 2 != 0)
    return ffi::Error::InvalidArgument("pj_bf16_gemm: expected x [M, K] and w [N, K], N a multiple of 16, K even");
  return AmxInto(pool, reinterpret_cast<const uint16_t*>(x.typed_data()),
                 reinterpret_cast<const uint16_t*>(w.typed_data()), static_cast<const float*>(nullptr), *y, xd[0],
                 wd[0], xd[1]);
}

ffi::Error Int8Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> s,
                    ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != wd[1] || sd[0] != wd[0] || sd[1] != 1 ||
      wd[0] % kTile != 0 || xd[1] % 2 != 0)
    return ffi::Error::InvalidArgument(
        "pj_int8_gemm: expected x [M, K], w [N, K] and s [N, 1], N a multiple of 16, K even");
  return AmxInto(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), w.typed_data(), s.typed_data(), *y, xd[0],
                 wd[0], xd[1]);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjInt8Gemm, Int8Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());

extern "C" int PjRequestAmx() { return AmxGranted(); }
