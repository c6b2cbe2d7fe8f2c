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
// and on AMX (f32 or bf16 out): pj_bf16_gemm / pj_int8_gemm (w [N, K]), pj_bf16_gemm_kn /
// pj_int8_gemm_kn (w [K, N]), pj_int4_gemm (nibble-packed, dequantised to bf16 block by block).
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
#include <string>
#include <type_traits>
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

// x [M, K], nibble-packed w [N, K / 2] and s [N, G] (groups of K / G a multiple of 128, and N a
// multiple of `channels`) -> M, N, K and G, or an error naming `target`.
ffi::Error Int4Shapes(const char* target, int64_t channels, ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::U8>& w,
                      ffi::Buffer<ffi::F32>& s, int64_t& M, int64_t& N, int64_t& K, int64_t& G) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != 2 * wd[1] || sd[0] != wd[0] || sd[1] < 1 ||
      xd[1] % (128 * sd[1]) != 0 || wd[0] % channels != 0)
    return ffi::Error::InvalidArgument(std::string(target) + ": expected x [M, K], w [N, K / 2] and s [N, G], " +
                                       (channels > 1 ? "N a multiple of 16, " : "") +
                                       "groups of K / G a multiple of 128");
  M = xd[0], N = wd[0], K = xd[1], G = sd[1];
  return ffi::Error::Success();
}

ffi::Error Int4Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> w,
                      ffi::Buffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, N, K, G;
  if (auto error = Int4Shapes("pj_int4_matvec", 1, x, w, s, M, N, K, G); error.failure()) return error;
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


// ---- bf16, int8 and int4 matrix products on AMX (from a few rows) -------------------------------
//
// AMX multiplies bf16 many times faster than AVX-512, and reads a weight at the memory's rate from
// two rows on (a batch's decoding, a prefill). XLA's YNNPACK reaches AMX only with platform-dependent
// math, and only for plain dots: not for int8 weights, nor a product a few rows wide. TDPBF16PS
// multiplies a tile A [16 rows, 32 bf16] by a tile B [16 bf16 pairs, 16 columns] whose 32-bit
// elements each hold two consecutive contracted inputs, accumulating into C [16, 16] float32 (bf16
// products exact, float32 sums).
//
// A weight stored output channels first ([N, K]) is the A operand, its rows read in place: the
// activations, packed once per call into B tiles, are the small operand, and C is y transposed
// (C[n, m]). A weight stored inputs first ([K, N], the checkpoint's layout) is the B operand: each
// block of it is packed into pairs as it is used, the activations are A tiles, and C is y. Each
// block of 2 x 2 tiles (32 channels x 32 rows) accumulates over a chunk of kAmxKc contracted inputs;
// its partial sums wait in a per-chunk buffer between chunks (the chunk's weight tiles stay in L1
// across all rows, the packed activations of a chunk in L2), and the last chunk's tiles are
// written into y. An int8 weight (per-channel scale) is converted to bf16 exactly as its block is
// copied, and its scale applied to the float32 sums; a nibble-packed int4 one is dequantised to
// bf16 as its block is copied (CopyNibbles). Every buffer a tile is loaded from starts on
// a 64-byte boundary and has 64-byte rows: a tile row across two cache lines halves TILELOADD's
// rate.

#define PJ_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

constexpr int64_t kTile = 16;        // rows of a tile; 16-bit pairs (or float32) per tile row
constexpr int64_t kTileK = 32;       // bf16 contracted inputs per tile row (64 bytes)
constexpr int64_t kTileElems = kTile * kTileK;  // bf16 per tile
constexpr int64_t kAmxKc = 256;      // contracted inputs per chunk
constexpr int64_t kAmxChannels = 128;  // output channels per parallel chunk

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (2 x 2), 4-5: the weight's, 6-7: the activations'; all 16 rows of 64 bytes.
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

// Rows [m0, m0 + 16) of x [M, K] (zero past M), one tile per 32 contracted inputs (zero past K),
// into xp[kt]: as B tiles [16 pairs, 16 rows] of 32-bit pairs (pairs), or as A tiles [16 rows, 32].
template <bool kPairs>
PJ_AVX512 void PackRowTiles(const uint16_t* x, int64_t M, int64_t K, int64_t m0, uint32_t* xp) {
  const int64_t tiles = (K + kTileK - 1) / kTileK;
  for (int64_t kt = 0; kt < tiles; ++kt) {
    const int64_t pairs = std::min<int64_t>(kTile, (K - kt * kTileK) / 2);
    const __mmask16 mask = pairs == kTile ? __mmask16(0xFFFF) : __mmask16((1u << pairs) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = m0 + i < M ? _mm512_maskz_loadu_epi32(mask, x + (m0 + i) * K + kt * kTileK) : _mm512_setzero_si512();
    if constexpr (kPairs) Transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(xp + kt * 256 + i * 16, r[i]);
  }
}

// Weight tiles [n, n + 16 NT) times row tiles [m, m + 16 MT), over `steps` tiles of contracted
// inputs: a, the weight's first tile (the next step's a_step elements on, its rows a_stride bytes
// apart, the second tile a_next elements on); b, the rows' first packed tile (b_next elements to
// the next 16 rows'). c: the block's four C tiles, its partial sums in (unless first) and out;
// C[n, m] for a weight [N, K] (the weight A), C[m, n] for a weight [K, N] (kKN: the weight B).
template <int NT, int MT, bool kKN>
PJ_AMX void AmxBlock(const uint16_t* a, int64_t a_step, int64_t a_stride, int64_t a_next, const uint32_t* b,
                     int64_t b_next, int64_t steps, float* c, bool first) {
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
    _tile_loadd(4, a + s * a_step, a_stride);
    if constexpr (NT > 1) _tile_loadd(5, a + a_next + s * a_step, a_stride);
    _tile_loadd(6, b + s * 256, 64);
    if constexpr (MT > 1) _tile_loadd(7, b + b_next + s * 256, 64);
    if constexpr (kKN) {
      _tile_dpbf16ps(0, 6, 4);
      if constexpr (NT > 1) _tile_dpbf16ps(2, 6, 5);
      if constexpr (MT > 1) _tile_dpbf16ps(1, 7, 4);
      if constexpr (NT > 1 && MT > 1) _tile_dpbf16ps(3, 7, 5);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (MT > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (NT > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT > 1 && MT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  if constexpr (MT > 1) _tile_stored(1, c + 256, 64);
  if constexpr (NT > 1) _tile_stored(2, c + 512, 64);
  if constexpr (NT > 1 && MT > 1) _tile_stored(3, c + 768, 64);
}

// One C tile c (16 channels from n, 16 rows from m; C[n, m] transposed first unless kKN) written
// into y [M, N] (float32, or bf16 rounded to nearest even once, as XLA converts; rows past M
// dropped), times the channels' scales where s is given.
template <bool kKN, typename O>
PJ_AMX void WriteTile(const float* c, const float* s, O* y, int64_t M, int64_t N, int64_t n, int64_t m) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + i * 16);
  if constexpr (!kKN) Transpose16(r);
  const __m512 scale = s ? _mm512_loadu_ps(s + n) : _mm512_set1_ps(1.0f);
  for (int i = 0; i < 16 && m + i < M; ++i) {
    const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(r[i]), scale);
    if constexpr (sizeof(O) == 4)
      _mm512_storeu_ps(y + (m + i) * N + n, v);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m + i) * N + n), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// 32 consecutive weights from p (those past `valid` zero) as bf16: int8 converted exactly.
template <typename W>
PJ_AMX __m512i LoadAsBf16(const W* p, int64_t valid) {
  const __mmask32 mask = valid >= 32 ? ~__mmask32(0) : valid <= 0 ? __mmask32(0) : (__mmask32(1) << valid) - 1;
  if constexpr (sizeof(W) == 1) {
    const __m256i bytes = _mm256_maskz_loadu_epi8(mask, p);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  } else {
    return _mm512_maskz_loadu_epi16(mask, p);
  }
}

// Nibble-packed int4 (`pack_int4`: each 128-input chunk 64 bytes, 16-bit word j holding inputs j,
// 32 + j, 64 + j and 96 + j), scaled per group of inputs: its blocks are dequantised to bf16 as they
// are copied (each weight times its group's scale, rounded once to bf16: what XLA's tiled form and
// the GPU's dequantise-in-the-fusion multiply), so the tiles' products use no other scale.
struct Nibbles {
  uint8_t bits;
};

// Rows [n, n + rows) of a nibble-packed weight (K inputs, scales s [N, G]), inputs [k0, k0 + width)
// (whole 128-input chunks) dequantised to bf16 -> a, rows of A tiles as CopyWeights lays them out.
PJ_AMX void CopyNibbles(const Nibbles* w, const float* s, int64_t G, int64_t K, int64_t n, int64_t rows, int64_t k0,
                        int64_t width, uint16_t* a) {
  const __m512i table = Int4Table();
  const int64_t group = K / G;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < width; k += 128) {
      const __m512i words = _mm512_loadu_si512(reinterpret_cast<const uint8_t*>(w) + (n + r) * (K / 2) + (k0 + k) / 2);
      const __m512 scale = _mm512_set1_ps(s[(n + r) * G + (k0 + k) / group]);
      for (int q = 0; q < 4; ++q) {  // inputs k + 32 q + j, j < 32
        const __m512i v = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4 * q), table);
        const __m512 lo = _mm512_mul_ps(_mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256(v)), scale);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64(v, 1)), scale);
        _mm512_storeu_si512(a + ((k + 32 * q) / kTileK * rows + r) * kTileK, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
}

// The weights of channels [n0, n1) (a multiple of 16) and inputs [k0, k0 + width) (zero past K)
// of w (bf16, or int8 converted) -> a, tile by tile: the 32 channels from n at
// a + (n - n0) width, step s and channel tile i at + (s nt + i) kTileElems (nt: 2, or 1 for a last
// 16). For a weight [N, K] its rows as they are (A tiles); for a weight [K, N] (kKN) pairs of its
// rows interleaved (B tiles: element (p, j) holds inputs 2p and 2p + 1 of channel j), read a whole
// row of the range at a time.
template <bool kKN, typename W>
PJ_AMX void CopyWeights(const W* w, const float* s, int64_t G, int64_t N, int64_t K, int64_t n0, int64_t n1,
                        int64_t k0, int64_t width, uint16_t* a) {
  if constexpr (std::is_same_v<W, Nibbles>) {
    static_assert(!kKN, "nibble-packed weights are stored output channels first");
    for (int64_t n = n0; n < n1; n += 2 * kTile) {
      const int64_t rows = std::min<int64_t>(2 * kTile, n1 - n);
      CopyNibbles(w, s, G, K, n, rows, k0, width, a + (n - n0) * width);
    }
  } else if constexpr (kKN) {
    // output element e of channel tile i takes channel 16 i + e / 2 of input row 2p + e % 2
    alignas(64) uint16_t order[2][32];
    for (int e = 0; e < 32; ++e) order[0][e] = (e & 1) * 32 + (e >> 1), order[1][e] = (e & 1) * 32 + 16 + (e >> 1);
    const __m512i lo = _mm512_load_si512(order[0]), hi = _mm512_load_si512(order[1]);
    for (int64_t k = 0; k < width; k += 2) {
      for (int64_t n = n0; n < n1; n += 2 * kTile) {
        const int64_t nt = std::min<int64_t>(2, (n1 - n) / kTile);
        const __m512i even = k0 + k < K ? LoadAsBf16(w + (k0 + k) * N + n, nt * kTile) : _mm512_setzero_si512();
        const __m512i odd = k0 + k + 1 < K ? LoadAsBf16(w + (k0 + k + 1) * N + n, nt * kTile) : _mm512_setzero_si512();
        uint16_t* tile = a + (n - n0) * width + (k / kTileK) * nt * kTileElems + (k % kTileK) * kTile;
        _mm512_storeu_si512(tile, _mm512_permutex2var_epi16(even, lo, odd));
        if (nt > 1) _mm512_storeu_si512(tile + kTileElems, _mm512_permutex2var_epi16(even, hi, odd));
      }
    }
  } else {
    for (int64_t n = n0; n < n1; n += 2 * kTile) {
      const int64_t rows = std::min<int64_t>(2 * kTile, n1 - n);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < width; k += kTileK)
          _mm512_storeu_si512(a + (n - n0) * width + (k / kTileK * rows + r) * kTileK,
                              LoadAsBf16(w + (n + r) * K + k0 + k, K - k0 - k));
    }
  }
}

// The part `part` of `parts` of the weights of channels [n, n + rows) and inputs
// [k0, min(K, k0 + width)) fetched into L2 ahead of their use: split by channels for a weight
// [N, K], by inputs for [K, N].
template <bool kKN, typename W>
inline void PrefetchWeights(const W* w, int64_t N, int64_t K, int64_t n, int64_t rows, int64_t k0, int64_t width,
                            int64_t part, int64_t parts) {
  const int64_t end = std::min(K, k0 + width);
  if constexpr (kKN) {
    for (int64_t k = k0 + (end - k0) * part / parts; k < k0 + (end - k0) * (part + 1) / parts; ++k)
      for (int64_t j = 0; j < rows; j += 64 / sizeof(W))
        _mm_prefetch(reinterpret_cast<const char*>(w + k * N + n + j), _MM_HINT_T1);
  } else {
    const auto bytes = [](int64_t inputs) {  // packed int4: two inputs per byte
      return std::is_same_v<W, Nibbles> ? inputs / 2 : inputs * static_cast<int64_t>(sizeof(W));
    };
    const char* base = reinterpret_cast<const char*>(w);
    for (int64_t r = rows * part / parts; r < rows * (part + 1) / parts; ++r)
      for (int64_t b = bytes(k0); b < bytes(end); b += 64) _mm_prefetch(base + bytes((n + r) * K) + b, _MM_HINT_T1);
  }
}

// Rows of x per pass: their packed tiles are kept for the pass (in L2 a chunk at a time), and
// every weight is read once per pass.
constexpr int64_t kAmxRowsPerPass = 512;

template <bool kKN, typename W, typename O>
PJ_AMX void AmxChannels(const uint32_t* xp, const W* w, const float* s, int64_t G, O* y, int64_t M, int64_t m0,
                        int64_t rows, int64_t N, int64_t K, int64_t n0, int64_t n1, float* partial, uint16_t* abuf) {
  const int64_t k_tiles = (K + kTileK - 1) / kTileK, m_tiles = (rows + kTile - 1) / kTile;
  const int64_t m_pairs = (m_tiles + 1) / 2, chunk_tiles = kAmxKc / kTileK;
  const int64_t b_next = k_tiles * 256;
  // A bf16 weight [N, K] whose rows hold whole tiles is read in place; others are copied (converted,
  // padded, paired).
  const bool copies = kKN || sizeof(W) == 1 || K % kTileK != 0;
  const float* out_scale = std::is_same_v<W, Nibbles> ? nullptr : s;  // int4's scales go in with the copy
  ConfigureTiles();
  const int64_t blocks = (n1 - n0 + 2 * kTile - 1) / (2 * kTile);
  for (int64_t kt0 = 0; kt0 < k_tiles; kt0 += chunk_tiles) {
    const int64_t steps = std::min(chunk_tiles, k_tiles - kt0);
    const bool first = kt0 == 0, last = kt0 + steps == k_tiles;
    // Weights stream into L2 ahead of their use, spread over the products (a burst of prefetches
    // stalls on the fill buffers): a copied chunk's successor, or a weight read in place's next
    // block; otherwise the copy, or the first tile loads, would wait on memory with AMX idle.
    if (copies) CopyWeights<kKN>(w, s, G, N, K, n0, n1, kt0 * kTileK, steps * kTileK, abuf);
    for (int64_t n = n0; n < n1; n += 2 * kTile) {
      const int64_t nt = std::min<int64_t>(2, (n1 - n) / kTile), block = (n - n0) / (2 * kTile);
      int64_t pn = n0, prows = n1 - n0, pk = (kt0 + steps) * kTileK, pw = last ? 0 : chunk_tiles * kTileK;
      int64_t part = block * m_pairs, parts = blocks * m_pairs;
      if (!copies) {
        pn = n + 2 * kTile, prows = std::min<int64_t>(2 * kTile, n1 - pn), part = 0, parts = m_pairs;
        pk = kt0 * kTileK, pw = pn < n1 ? steps * kTileK : 0;
      }
      const uint16_t* a = abuf + (n - n0) * steps * kTileK;
      int64_t a_step = nt * kTileElems, a_stride = 64, a_next = kTileElems;
      if (!copies) {
        a = reinterpret_cast<const uint16_t*>(w) + n * K + kt0 * kTileK;
        a_step = kTileK, a_stride = K * 2, a_next = kTile * K;
      }
      for (int64_t mp = 0; mp < m_pairs; ++mp) {
        const int64_t mt = std::min<int64_t>(2, m_tiles - 2 * mp);
        const uint32_t* b = xp + (2 * mp * k_tiles + kt0) * 256;
        if (pw) PrefetchWeights<kKN>(w, N, K, pn, prows, pk, pw, part + mp, parts);
        float* c = partial + (block * m_pairs + mp) * 1024;
        if (nt == 2 && mt == 2) AmxBlock<2, 2, kKN>(a, a_step, a_stride, a_next, b, b_next, steps, c, first);
        else if (nt == 2) AmxBlock<2, 1, kKN>(a, a_step, a_stride, a_next, b, b_next, steps, c, first);
        else if (mt == 2) AmxBlock<1, 2, kKN>(a, a_step, a_stride, a_next, b, b_next, steps, c, first);
        else AmxBlock<1, 1, kKN>(a, a_step, a_stride, a_next, b, b_next, steps, c, first);
        if (last)
          for (int i = 0; i < nt; ++i)
            for (int j = 0; j < mt; ++j)
              WriteTile<kKN>(c + (2 * i + j) * 256, out_scale, y, M, N, n + i * kTile, m0 + 2 * mp * kTile + j * kTile);
      }
    }
  }
  _tile_release();
}

// n elements of v's storage from a 64-byte boundary.
template <typename T>
T* Aligned(std::vector<T>& v, int64_t n) {
  v.resize(n + 64 / sizeof(T));
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
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

template <bool kKN, typename W, typename O>
ffi::Error AmxProduct(ffi::ThreadPool& pool, const uint16_t* x, const W* w, const float* s, int64_t G, O* y,
                      int64_t M, int64_t N, int64_t K) {
  if (!AmxGranted()) return ffi::Error(ffi::ErrorCode::kUnavailable, "AMX is not available to this process");
  const int64_t k_tiles = (K + kTileK - 1) / kTileK;
  thread_local std::vector<uint32_t> packed;
  for (int64_t m0 = 0; m0 < M; m0 += kAmxRowsPerPass) {
    const int64_t rows = std::min(kAmxRowsPerPass, M - m0), m_tiles = (rows + kTile - 1) / kTile;
    uint32_t* xp = Aligned(packed, m_tiles * k_tiles * 256);
    ParallelFor(pool, m_tiles, [=](int64_t t) {
      PackRowTiles<!kKN>(x + m0 * K, rows, K, t * kTile, xp + t * k_tiles * 256);
    });
    const int64_t chunks = (N + kAmxChannels - 1) / kAmxChannels;
    ParallelFor(pool, chunks, [=](int64_t ch) {
      thread_local std::vector<float> partial;
      thread_local std::vector<uint16_t> abuf;
      float* c = Aligned(partial, kAmxChannels / (2 * kTile) * ((m_tiles + 1) / 2) * 1024);
      uint16_t* a = Aligned(abuf, kAmxChannels * kAmxKc);
      AmxChannels<kKN>(xp, w, s, G, y, M, m0, rows, N, K, ch * kAmxChannels, std::min(N, (ch + 1) * kAmxChannels),
                       c, a);
    });
  }
  return ffi::Error::Success();
}

// y float32, or bf16 (the sums rounded once: what the model keeps, at half the bytes written).
template <bool kKN, typename W>
ffi::Error AmxInto(ffi::ThreadPool& pool, const uint16_t* x, const W* w, const float* s, int64_t G,
                   ffi::AnyBuffer y, int64_t M, int64_t N, int64_t K) {
  if (y.element_type() == ffi::DataType::BF16)
    return AmxProduct<kKN>(pool, x, w, s, G, static_cast<uint16_t*>(y.untyped_data()), M, N, K);
  if (y.element_type() == ffi::DataType::F32)
    return AmxProduct<kKN>(pool, x, w, s, G, static_cast<float*>(y.untyped_data()), M, N, K);
  return ffi::Error::InvalidArgument("the AMX products write float32 or bf16");
}

// x [M, K] and w [N, K] (or [K, N], kKN) -> M, N and K, or an error naming `target`.
template <bool kKN, typename Wt>
ffi::Error GemmShapes(const char* target, ffi::Buffer<ffi::BF16>& x, Wt& w, int64_t& M, int64_t& N, int64_t& K) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != (kKN ? wd[0] : wd[1]) || (kKN ? wd[1] : wd[0]) % kTile != 0 ||
      xd[1] % 2 != 0)
    return ffi::Error::InvalidArgument(std::string(target) + ": expected x [M, K] and w " +
                                       (kKN ? "[K, N]" : "[N, K]") + ", N a multiple of 16, K even");
  M = xd[0], N = kKN ? wd[1] : wd[0], K = xd[1];
  return ffi::Error::Success();
}

template <bool kKN>
ffi::Error Bf16Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::Result<ffi::AnyBuffer> y) {
  int64_t M, N, K;
  if (auto error = GemmShapes<kKN>(kKN ? "pj_bf16_gemm_kn" : "pj_bf16_gemm", x, w, M, N, K); error.failure())
    return error;
  return AmxInto<kKN>(pool, reinterpret_cast<const uint16_t*>(x.typed_data()),
                      reinterpret_cast<const uint16_t*>(w.typed_data()), static_cast<const float*>(nullptr), 1, *y, M,
                      N, K);
}

template <bool kKN>
ffi::Error Int8Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> s,
                    ffi::Result<ffi::AnyBuffer> y) {
  const char* target = kKN ? "pj_int8_gemm_kn" : "pj_int8_gemm";
  int64_t M, N, K;
  if (auto error = GemmShapes<kKN>(target, x, w, M, N, K); error.failure()) return error;
  if (s.element_count() != static_cast<size_t>(N))
    return ffi::Error::InvalidArgument(std::string(target) + ": expected one scale per output channel");
  return AmxInto<kKN>(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), w.typed_data(), s.typed_data(), 1, *y,
                      M, N, K);
}

ffi::Error Int4Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> s,
                    ffi::Result<ffi::AnyBuffer> y) {
  int64_t M, N, K, G;
  if (auto error = Int4Shapes("pj_int4_gemm", kTile, x, w, s, M, N, K, G); error.failure()) return error;
  return AmxInto<false>(pool, reinterpret_cast<const uint16_t*>(x.typed_data()),
                        reinterpret_cast<const Nibbles*>(w.typed_data()), s.typed_data(), G, *y, M, N, K);
}

// The AMX GEMMs' arguments: x bf16 and a weight of type W (then, for a quantised one, its float32
// scales); the result float32 or bf16.
template <ffi::DataType W>
auto AmxBinding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::BF16>>().Arg<ffi::Buffer<W>>();
}

template <ffi::DataType W>
auto ScaledAmxBinding() {
  return AmxBinding<W>().template Arg<ffi::Buffer<ffi::F32>>().template Ret<ffi::AnyBuffer>();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjBf16Gemm, Bf16Gemm<false>, AmxBinding<ffi::BF16>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PjBf16GemmKn, Bf16Gemm<true>, AmxBinding<ffi::BF16>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PjInt8Gemm, Int8Gemm<false>, ScaledAmxBinding<ffi::S8>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PjInt8GemmKn, Int8Gemm<true>, ScaledAmxBinding<ffi::S8>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PjInt4Gemm, Int4Gemm, ScaledAmxBinding<ffi::U8>());

extern "C" int PjRequestAmx() { return AmxGranted(); }
