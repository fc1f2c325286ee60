// CPU squared Mahalanobis distances: per position, the centred rows of a chunk of samples times
// the lower triangle of that position's factor, squared and summed.
//
// Why this shape: out[r] = ||c_r L||^2 over the rows c_r of a chunk is a small triangular matrix
// product, (n x D) by (D x D lower), so the kernels are register-blocked like a GEMM micro-kernel:
// R centred rows by a panel of W output columns j0 .. j0+W (W = the vector width), accumulated
// over the factor's rows i >= j0 (above j0 the panel is zero). Each step loads W entries of the
// factor once for R samples and broadcasts R centred values: R independent FMA chains.
//
// The factor's lower triangle is first packed panel by panel (reading it row by row, so the
// upper triangle is never read): panel k holds rows i >= kW of columns kW .. kW+W, contiguous,
// with zeros right of the diagonal and past column D. The micro-kernel then runs one unmasked
// loop per panel over contiguous memory, and only the W x W diagonal block of each panel does
// work that is not needed. Packing costs about 1/B of the arithmetic and is done once per
// position and chunk of samples (once per thread for a shared factor).
//
// Work is split over tiles of (consecutive positions) x (a chunk of samples) with
// at::parallel_for; a thread centres a tile's rows once into its own buffer (never a (B, P, D)
// tensor), reading x through its strides:
//  * features contiguous ((B, P, D) memory, channels-last CNN features): one position per tile,
//    each row read directly;
//  * positions contiguous (a channels-first CNN's (B, D, P) memory seen as (B, P, D)): up to 64
//    positions per tile, so that each feature of a sample is one contiguous run of x, turned into
//    rows 16 x 16 at a time through registers (AVX-512). Read one position at a time, such x
//    costs a new page per feature: 46 ms instead of 15 at PaDiM's shape (B 32, P 3136, D 100).
// With one factor per position the op streams P factors from memory, so the next position's
// factor triangle and the next tile's part of x are prefetched while a tile computes.
// The instruction set (AVX-512, AVX2 or portable) is chosen per call (fastad/cpu_isa.h); the
// variable FASTAD_MAHALANOBIS_CPU_ISA forces a lesser one.

// First, so that this is where the intrinsics header is read: GCC 12 reports its own
// _mm512_undefined_* placeholders as uninitialised wherever AVX-512 shuffles are inlined (GCC bug
// 105593, fixed in GCC 13), and the warnings point into the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "fastad/cpu_isa.h"
#include "mahalanobis.h"

namespace fastad {
namespace {

// Samples per tile.
constexpr int64_t kChunk = 64;
// Positions per tile when x's features are strided; the tile's centred rows stay within
// kBlockFloats floats (1 MB, inside a core's L2 cache).
constexpr int64_t kBlock = 64;
constexpr int64_t kBlockFloats = int64_t{1} << 18;
// Tiles smaller than this many multiply-adds are grouped so a thread's share is worth a fork.
constexpr int64_t kMinMacsPerTask = int64_t{1} << 17;
// Prefetching the next tile (its factor triangle, D^2 / 2 floats, and its rows of x) pays only
// while that fits in cache next to the current one; larger D is left to the hardware.
constexpr int64_t kPrefetchMaxD = 256;

// A factor made ready for a kernel: packed into `buffer` (returned), or L itself.
using PrepareFn = const float* (*)(const float* L, int64_t d, float* buffer);
// out[r] = ||c_r L||^2 for the n <= kChunk contiguous centred rows c (row stride d), from the
// prepared factor; sq holds max(kChunk x 16, d) floats of scratch.
using SumsFn = void (*)(const float* c, int64_t n, int64_t d, const float* factor, float* sq, float* out);

// dst[(k n + r) d + i] = x[r, k, i] - mean[k mean_step + i] for r < n, k < np, i < d, where
// x[r, k, i] is at x + r sb + i sd + k (positions contiguous); dst holds np x n x d floats.
using CentreRunsFn = void (*)(const float* x, int64_t sb, int64_t sd, int64_t n, int64_t np,
                              int64_t d, const float* mean, int64_t mean_step, float* dst);

struct Kernels {
  int64_t width;  // panel width W of the packed layout; 0: the factor is used as it is
  PrepareFn prepare;
  SumsFn sums;
  CentreRunsFn centre_runs;  // nullptr: a scalar loop does it
};

// Floats of the packed layout: panel k holds D - kW rows of W floats.
int64_t packed_floats(int64_t d, int64_t w) {
  if (w == 0) return 0;
  const int64_t panels = (d + w - 1) / w;
  return w * (panels * d - w * panels * (panels - 1) / 2);
}

// Offset of panel k in the packed layout.
inline int64_t panel_offset(int64_t k, int64_t d, int64_t w) { return w * (k * d - w * k * (k - 1) / 2); }

// The partial sums of one row, pairwise (once per row: no need for a shuffle network).
template <int N>
inline float sum_lanes(const float* s) {
  if constexpr (N == 1) {
    return s[0];
  } else {
    return sum_lanes<N / 2>(s) + sum_lanes<N / 2>(s + N / 2);
  }
}

// ---- AVX-512: panels of 16 columns, R <= 16 rows ------------------------------------------------

inline __mmask16 first_lanes16(int64_t count) {  // lanes 0 .. count-1, count clamped to [0, 16]
  if (count <= 0) return 0;
  if (count >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << count) - 1u);
}

// Row i of the factor holds entries of panels 0 .. i/16; the masked load stops at the diagonal,
// so nothing right of it is read and the rest of the vector is zero.
__attribute__((target("avx512f"))) const float* pack_avx512(const float* L, int64_t d, float* dst) {
  for (int64_t i = 0; i < d; ++i)
    for (int64_t k = 0; 16 * k <= i; ++k)
      _mm512_storeu_ps(dst + panel_offset(k, d, 16) + (i - 16 * k) * 16,
                       _mm512_maskz_loadu_ps(first_lanes16(i + 1 - 16 * k), L + i * d + 16 * k));
  return dst;
}

// v[a] holds row a of a 16 x 16 block (lane l: element (a, l)); afterwards v[l] holds column l
// (lane a: element (a, l)).
__attribute__((target("avx512f"))) inline void transpose16x16(__m512 v[16]) {
  __m512 t[16];
  for (int a = 0; a < 8; ++a) {  // within 128-bit quads: pairs of rows interleaved
    t[2 * a] = _mm512_unpacklo_ps(v[2 * a], v[2 * a + 1]);
    t[2 * a + 1] = _mm512_unpackhi_ps(v[2 * a], v[2 * a + 1]);
  }
  __m512 s[4][4];  // s[g][c], quad q: rows 4g .. 4g+3 of column 4q + c
  for (int g = 0; g < 4; ++g) {
    const __m512d lo = _mm512_castps_pd(t[4 * g]), hi = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d lo2 = _mm512_castps_pd(t[4 * g + 2]), hi2 = _mm512_castps_pd(t[4 * g + 3]);
    s[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, lo2));
    s[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, lo2));
    s[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi, hi2));
    s[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi, hi2));
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of quads
    const __m512 u0 = _mm512_shuffle_f32x4(s[0][c], s[1][c], 0x44);  // quads 0, 1 of each
    const __m512 u1 = _mm512_shuffle_f32x4(s[0][c], s[1][c], 0xEE);  // quads 2, 3 of each
    const __m512 u2 = _mm512_shuffle_f32x4(s[2][c], s[3][c], 0x44);
    const __m512 u3 = _mm512_shuffle_f32x4(s[2][c], s[3][c], 0xEE);
    v[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    v[4 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    v[8 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    v[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
}

// A CentreRunsFn: 16 positions x 16 features at a time through registers, 16 loads, a transpose
// and 16 stores instead of 256 scalar loads and stores. Masked loads read nothing past np or d.
__attribute__((target("avx512f"))) void centre_runs_avx512(const float* x, int64_t sb, int64_t sd,
                                                          int64_t n, int64_t np, int64_t d,
                                                          const float* mean, int64_t mean_step,
                                                          float* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k0 = 0; k0 < np; k0 += 16) {
      const __mmask16 positions = first_lanes16(np - k0);
      for (int64_t i0 = 0; i0 < d; i0 += 16) {
        const __mmask16 features = first_lanes16(d - i0);
        __m512 v[16];
        for (int a = 0; a < 16; ++a)  // row a: feature i0 + a at positions k0 ..
          v[a] = i0 + a < d ? _mm512_maskz_loadu_ps(positions, x + r * sb + (i0 + a) * sd + k0)
                            : _mm512_setzero_ps();
        transpose16x16(v);
        for (int b = 0; b < 16 && k0 + b < np; ++b) {  // position k0 + b: features i0 ..
          const float* m = mean + (k0 + b) * mean_step + i0;
          _mm512_mask_storeu_ps(dst + ((k0 + b) * n + r) * d + i0, features,
                                _mm512_sub_ps(v[b], _mm512_maskz_loadu_ps(features, m)));
        }
      }
    }
}

// The loops over R are unrolled by pragma: GCC scalarises the accumulator array only when they are
// unrolled early; otherwise it keeps the array in memory and stores every accumulator on every
// step, which halved the speed.

// sq[16 r ..] += lane-wise squares of (c_r L)[j0 .. j0 + 16) for r < R; `panel` starts at row j0.
template <int R>
__attribute__((target("avx512f"))) void panel_avx512(const float* c, int64_t d, const float* panel,
                                                    int64_t j0, float* sq) {
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = j0; i < d; ++i) {
    const __m512 l = _mm512_loadu_ps(panel + (i - j0) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(c[r * d + i]), l, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(sq + 16 * r, _mm512_fmadd_ps(acc[r], acc[r], _mm512_loadu_ps(sq + 16 * r)));
}

using PanelFn = void (*)(const float*, int64_t, const float*, int64_t, float*);

constexpr int kRowsAvx512 = 16;  // 16 FMA chains: enough to cover the latency of two FMA ports

template <std::size_t... R>
constexpr std::array<PanelFn, sizeof...(R)> panels_avx512(std::index_sequence<R...>) {
  return {&panel_avx512<static_cast<int>(R) + 1>...};
}

__attribute__((target("avx512f"))) void sums_avx512(const float* c, int64_t n, int64_t d,
                                                   const float* packed, float* sq, float* out) {
  static constexpr auto kPanels = panels_avx512(std::make_index_sequence<kRowsAvx512>{});
  std::fill(sq, sq + 16 * n, 0.0f);
  for (int64_t k = 0; 16 * k < d; ++k) {
    const float* panel = packed + panel_offset(k, d, 16);
    for (int64_t r0 = 0; r0 < n; r0 += kRowsAvx512)
      kPanels[std::min<int64_t>(kRowsAvx512, n - r0) - 1](c + r0 * d, d, panel, 16 * k, sq + 16 * r0);
  }
  for (int64_t r = 0; r < n; ++r) out[r] = sum_lanes<16>(sq + 16 * r);
}

// ---- AVX2: panels of 8 columns, R <= 8 rows -------------------------------------------------------

// Lanes 0 .. count-1 as a maskload mask (count clamped to [0, 8]); masked lanes are not read.
__attribute__((target("avx2,fma"))) inline __m256i first_lanes8(int64_t count) {
  const int n = static_cast<int>(std::clamp<int64_t>(count, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) const float* pack_avx2(const float* L, int64_t d, float* dst) {
  for (int64_t i = 0; i < d; ++i)
    for (int64_t k = 0; 8 * k <= i; ++k)
      _mm256_storeu_ps(dst + panel_offset(k, d, 8) + (i - 8 * k) * 8,
                       _mm256_maskload_ps(L + i * d + 8 * k, first_lanes8(i + 1 - 8 * k)));
  return dst;
}

template <int R>
__attribute__((target("avx2,fma"))) void panel_avx2(const float* c, int64_t d, const float* panel,
                                                   int64_t j0, float* sq) {
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = j0; i < d; ++i) {
    const __m256 l = _mm256_loadu_ps(panel + (i - j0) * 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(c + r * d + i), l, acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    _mm256_storeu_ps(sq + 8 * r, _mm256_fmadd_ps(acc[r], acc[r], _mm256_loadu_ps(sq + 8 * r)));
}

constexpr int kRowsAvx2 = 8;  // 8 accumulators + the panel row + a broadcast: 10 of 16 registers

template <std::size_t... R>
constexpr std::array<PanelFn, sizeof...(R)> panels_avx2(std::index_sequence<R...>) {
  return {&panel_avx2<static_cast<int>(R) + 1>...};
}

__attribute__((target("avx2,fma"))) void sums_avx2(const float* c, int64_t n, int64_t d,
                                                  const float* packed, float* sq, float* out) {
  static constexpr auto kPanels = panels_avx2(std::make_index_sequence<kRowsAvx2>{});
  std::fill(sq, sq + 8 * n, 0.0f);
  for (int64_t k = 0; 8 * k < d; ++k) {
    const float* panel = packed + panel_offset(k, d, 8);
    for (int64_t r0 = 0; r0 < n; r0 += kRowsAvx2)
      kPanels[std::min<int64_t>(kRowsAvx2, n - r0) - 1](c + r0 * d, d, panel, 8 * k, sq + 8 * r0);
  }
  for (int64_t r = 0; r < n; ++r) out[r] = sum_lanes<8>(sq + 8 * r);
}

// ---- Portable: the definition, row by row of the factor (no packing) ---------------------------------

const float* unpacked(const float* L, int64_t, float*) { return L; }

// y: d floats of scratch.
void sums_portable(const float* c, int64_t n, int64_t d, const float* L, float* y, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const float* cr = c + r * d;
    std::fill(y, y + d, 0.0f);
    for (int64_t i = 0; i < d; ++i) {  // y[j] += c[i] L[i, j] for j <= i: row i's lower part only
      const float ci = cr[i];
      const float* li = L + i * d;
      for (int64_t j = 0; j <= i; ++j) y[j] += ci * li[j];
    }
    float s = 0.0f;
    for (int64_t j = 0; j < d; ++j) s += y[j] * y[j];
    out[r] = s;
  }
}

Kernels kernels_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return {16, pack_avx512, sums_avx512, centre_runs_avx512};
    case CpuIsa::kAvx2:
      return {8, pack_avx2, sums_avx2, nullptr};
    default:
      return {0, unpacked, sums_portable, nullptr};
  }
}

// Asks for the cache lines of `floats` floats from `p` on (a hint: never faults, never waits).
inline void prefetch(const float* p, int64_t floats) {
  const char* a = reinterpret_cast<const char*>(p);
  const char* end = reinterpret_cast<const char*>(p + floats);
  for (; a < end; a += 64) __builtin_prefetch(a, 0, 2);
  __builtin_prefetch(end - 1, 0, 2);  // the last line when p is not line-aligned
}

}  // namespace

at::Tensor mahalanobis_cpu(const at::Tensor& x, const at::Tensor& mean_in, const at::Tensor& L_in) {
  check_mahalanobis_args(x, mean_in, L_in);
  const int64_t b_size = x.size(0), p_size = x.size(1), d = x.size(2);
  at::Tensor out = at::empty({b_size, p_size}, x.options());
  if (b_size == 0 || p_size == 0) return out;
  const Kernels kernels = kernels_for(cpu_isa("FASTAD_MAHALANOBIS_CPU_ISA"));

  const at::Tensor mean = mean_in.contiguous(), L = L_in.contiguous();  // no copy when already so
  const float* xp = x.const_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  const float* lp = L.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t sb = x.stride(0), sp = x.stride(1), sd = x.stride(2);
  const bool rows_contiguous = sd == 1 || d == 1;
  const int64_t mean_step = mean.size(0) == 1 ? 0 : d;  // floats between two positions' means
  const bool shared_factor = L.size(0) == 1;

  // Tiles: `block` consecutive positions x `chunk` samples, block-major.
  // Fewer positions than threads (Gaussian AD scores one pooled vector per image: P = 1): smaller
  // chunks of samples, but whole micro-kernel groups, so that every thread gets a tile.
  int64_t chunk = std::min(b_size, kChunk);
  const int64_t threads = at::get_num_threads();
  if (p_size < threads) chunk = std::min(chunk, std::max<int64_t>(16, (b_size + threads - 1) / threads));
  const int64_t chunks = (b_size + chunk - 1) / chunk;
  const int64_t block =
      rows_contiguous ? 1 : std::clamp<int64_t>(kBlockFloats / (chunk * d), 1, std::min(kBlock, p_size));
  const int64_t blocks = (p_size + block - 1) / block;
  const int64_t tile_macs = block * chunk * d * (d + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerTask / std::max<int64_t>(1, tile_macs));
  struct Tile {
    int64_t p0, np, b0, n;  // positions p0 .. p0+np, samples b0 .. b0+n
  };
  const auto tile_at = [&](int64_t t) {
    const int64_t p0 = std::min(t / chunks, blocks - 1) * block, b0 = (t % chunks) * chunk;
    return Tile{p0, std::min(block, p_size - p0), b0, std::min(chunk, b_size - b0)};
  };
  at::parallel_for(0, blocks * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> centred(static_cast<size_t>(block * chunk * d));  // [position][sample][i]
    std::vector<float> packed(static_cast<size_t>(packed_floats(d, kernels.width)));
    std::vector<float> sq(static_cast<size_t>(std::max(kChunk * 16, d)));  // the portable kernel's y too
    float dist[kChunk];
    int64_t ready = -1;  // the factor in `factor`
    const float* factor = nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = tile_at(t), next = tile_at(t + 1);
      const bool has_next = t + 1 < end;  // and it is this thread's
      if (rows_contiguous) {
        for (int64_t k = 0; k < tile.np; ++k)
          for (int64_t r = 0; r < tile.n; ++r) {
            const float* xr = xp + (tile.b0 + r) * sb + (tile.p0 + k) * sp;
            const float* m = mp + (tile.p0 + k) * mean_step;
            float* cr = centred.data() + (k * tile.n + r) * d;
            for (int64_t i = 0; i < d; ++i) cr[i] = xr[i * sd] - m[i];
          }
        if (has_next && sd == 1 && d <= kPrefetchMaxD)  // the next tile's rows (one position)
          for (int64_t r = 0; r < next.n; ++r) prefetch(xp + (next.b0 + r) * sb + next.p0 * sp, d);
      } else {
        const float* xt = xp + tile.b0 * sb + tile.p0 * sp;
        const float* mt = mp + tile.p0 * mean_step;
        if (sp == 1 && kernels.centre_runs != nullptr) {
          kernels.centre_runs(xt, sb, sd, tile.n, tile.np, d, mt, mean_step, centred.data());
        } else {
          for (int64_t r = 0; r < tile.n; ++r)
            for (int64_t i = 0; i < d; ++i) {  // feature i of sample r at np positions: one run of x
              const float* run = xt + r * sb + i * sd;
              for (int64_t k = 0; k < tile.np; ++k)
                centred[(k * tile.n + r) * d + i] = run[k * sp] - mt[k * mean_step + i];
            }
        }
      }
      // Runs of x are short (np floats), each in its own page: too scattered for the hardware
      // prefetcher, so the next tile's are prefetched here, a share before each position.
      const bool fetch_runs = has_next && !rows_contiguous && sp == 1;
      const int64_t runs = next.n * d;
      for (int64_t k = 0; k < tile.np; ++k) {
        if (fetch_runs)
          for (int64_t u = runs * k / tile.np; u < runs * (k + 1) / tile.np; ++u)
            prefetch(xp + (next.b0 + u / d) * sb + next.p0 + (u % d) * sd, next.np);
        const int64_t p = tile.p0 + k;
        const int64_t q = shared_factor ? 0 : p;
        const int64_t q_next = k + 1 < tile.np ? p + 1 : next.p0;
        if (!shared_factor && d <= kPrefetchMaxD && (k + 1 < tile.np || has_next) && q_next != q)
          for (int64_t i = 0; i < d; ++i) prefetch(lp + (q_next * d + i) * d, i + 1);  // to the diagonal
        if (q != ready) {
          factor = kernels.prepare(lp + q * d * d, d, packed.data());
          ready = q;
        }
        kernels.sums(centred.data() + k * tile.n * d, tile.n, d, factor, sq.data(), dist);
        for (int64_t r = 0; r < tile.n; ++r) op[(tile.b0 + r) * p_size + p] = dist[r];
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastad, CPU, m) { m.impl("mahalanobis", &mahalanobis_cpu); }

}  // namespace fastad
