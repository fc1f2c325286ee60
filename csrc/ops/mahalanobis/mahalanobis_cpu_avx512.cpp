// AVX-512 pieces of the CPU Mahalanobis op: panels of 16 factor columns, the rows kernel (up to
// 16 samples by one panel) and the lanes kernel (32 samples by half a panel), and the centring of
// x into either layout through 16 x 16 register transposes. See mahalanobis_cpu_kernels.h.

// First, so that this is where the intrinsics header is read: GCC 12 reports its own
// _mm512_undefined_* placeholders as uninitialised wherever AVX-512 shuffles are inlined (GCC bug
// 105593, fixed in GCC 13), and the warnings point into the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "mahalanobis_cpu_kernels.h"

namespace fastad::mahalanobis_kernels {
namespace {

constexpr int64_t kW = 16;  // panel width: one vector

inline __mmask16 first_lanes16(int64_t count) {  // lanes 0 .. count-1, count clamped to [0, 16]
  if (count <= 0) return 0;
  if (count >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << count) - 1u);
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
  for (int c = 0; c < 4; ++c) {                                      // a 4 x 4 transpose of quads
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

// ---- packing ----------------------------------------------------------------------------------

// Row-major: row i of the factor holds entries of panels 0 .. i/16; the masked load stops at the
// diagonal, so nothing right of it is read and the rest of the vector is zero.
__attribute__((target("avx512f"))) void pack_rows(FactorView L, int64_t d, float* dst) {
  for (int64_t i = 0; i < d; ++i)
    for (int64_t k = 0; kW * k <= i; ++k)
      _mm512_storeu_ps(
          dst + panel_offset(k, d, kW) + (i - kW * k) * kW,
          _mm512_maskz_loadu_ps(first_lanes16(i + 1 - kW * k), L.p + i * L.si + kW * k));
}

// Column-major (torch.linalg.cholesky's factors): column j is contiguous from the diagonal down.
// 16 columns x 16 rows are loaded as column runs (masked to the lower triangle), transposed in
// registers and stored as 16 panel rows.
__attribute__((target("avx512f"))) void pack_columns(FactorView L, int64_t d, float* dst) {
  for (int64_t k = 0; kW * k < d; ++k) {
    const int64_t j0 = kW * k;
    float* panel = dst + panel_offset(k, d, kW);
    for (int64_t i0 = j0; i0 < d; i0 += 16) {
      const __mmask16 rows = first_lanes16(d - i0);
      __m512 v[16];
      for (int l = 0; l < 16;
           ++l) {  // column j0 + l, rows i0 .. i0+15 that are on or below its diagonal
        const int64_t j = j0 + l;
        const __mmask16 lower = static_cast<__mmask16>(rows & ~first_lanes16(j - i0));
        v[l] = j < d ? _mm512_maskz_loadu_ps(lower, L.p + j * L.sj + i0) : _mm512_setzero_ps();
      }
      transpose16x16(v);
      for (int64_t a = 0; a < 16 && i0 + a < d; ++a)
        _mm512_storeu_ps(panel + (i0 + a - j0) * kW, v[a]);
    }
  }
}

// Row-major to column-major (lower triangle only): blocks of 16 rows x 16 columns on or below the
// diagonal are loaded as row runs (masked so that nothing right of the diagonal is read),
// transposed in registers and stored as column runs: dst[j d + i] = L[i, j] for i >= j. The
// lanes kernel reads column-major factors as a few sequential streams.
__attribute__((target("avx512f"))) void rows_to_columns(FactorView L, int64_t d, float* dst) {
  for (int64_t j0 = 0; j0 < d; j0 += 16) {
    const __mmask16 columns = first_lanes16(d - j0);
    for (int64_t i0 = j0; i0 < d; i0 += 16) {
      __m512 v[16];
      for (int a = 0; a < 16; ++a) {  // row i0 + a, columns j0 .. up to its diagonal
        const int64_t i = i0 + a;
        v[a] = i < d
                   ? _mm512_maskz_loadu_ps(columns & first_lanes16(i + 1 - j0), L.p + i * L.si + j0)
                   : _mm512_setzero_ps();
      }
      transpose16x16(v);
      const __mmask16 rows = first_lanes16(d - i0);
      for (int64_t l = 0; l < 16 && j0 + l < d; ++l)
        _mm512_mask_storeu_ps(dst + (j0 + l) * d + i0, rows, v[l]);
    }
  }
}

const float* prepare(FactorView L, int64_t d, float* dst) {
  if (L.sj == 1) {
    pack_rows(L, d, dst);
  } else if (L.si == 1) {
    pack_columns(L, d, dst);
  } else {
    pack_strided(L, d, kW, dst);
  }
  return dst;
}

// ---- the rows kernel: R <= 16 samples by one panel of 16 columns --------------------------------

// The loops over R are unrolled by pragma: GCC scalarises the accumulator array only when they are
// unrolled early; otherwise it keeps the array in memory and stores every accumulator on every
// step, which halved the speed.

// sq[16 r ..] += lane-wise squares of (c_r L)[j0 .. j0 + 16) for r < R; `panel` starts at row j0.
template <int R>
__attribute__((target("avx512f"))) void rows_panel(const float* c, int64_t d, const float* panel,
                                                   int64_t j0, float* sq) {
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = j0; i < d; ++i) {
    const __m512 l = _mm512_loadu_ps(panel + (i - j0) * kW);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(c[r * d + i]), l, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(sq + 16 * r, _mm512_fmadd_ps(acc[r], acc[r], _mm512_loadu_ps(sq + 16 * r)));
}

using RowsPanelFn = void (*)(const float*, int64_t, const float*, int64_t, float*);

constexpr int kRows = 16;  // 16 FMA chains: enough to cover the latency of two FMA ports

template <std::size_t... R>
constexpr std::array<RowsPanelFn, sizeof...(R)> rows_panels(std::index_sequence<R...>) {
  return {&rows_panel<static_cast<int>(R) + 1>...};
}

// The partial sums of one row, pairwise.
inline float sum16(const float* s) {
  float h[8];
  for (int a = 0; a < 8; ++a) h[a] = s[a] + s[a + 8];
  for (int a = 0; a < 4; ++a) h[a] += h[a + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
}

__attribute__((target("avx512f"))) void rows_sums(const float* c, int64_t n, int64_t d,
                                                  const float* packed, float* sq, float* out) {
  static constexpr auto kPanels = rows_panels(std::make_index_sequence<kRows>{});
  std::fill(sq, sq + 16 * n, 0.0f);
  for (int64_t k = 0; kW * k < d; ++k) {
    const float* panel = packed + panel_offset(k, d, kW);
    for (int64_t r0 = 0; r0 < n; r0 += kRows)
      kPanels[std::min<int64_t>(kRows, n - r0) - 1](c + r0 * d, d, panel, kW * k, sq + 16 * r0);
  }
  for (int64_t r = 0; r < n; ++r) out[r] = sum16(sq + 16 * r);
}

// ---- the lanes kernel: 2 vectors of 16 samples by 8 columns of a column-major factor -----------

// The traits and the kernel compile for this instruction set (the intrinsics must inline).
#pragma GCC push_options
#pragma GCC target("avx512f")
struct Vec512 {
  using type = __m512;
  static constexpr int kWidth = 16;
  static type zero() { return _mm512_setzero_ps(); }
  static type load(const float* p) { return _mm512_load_ps(p); }
  static type set1(float x) { return _mm512_set1_ps(x); }
  static type fmadd(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, type x) { _mm512_store_ps(p, x); }
};
#include "mahalanobis_cpu_lanes.inc"
#pragma GCC pop_options

// 2 x 8 accumulators, 2 sample vectors, 1 broadcast of 32 zmm registers.
__attribute__((target("avx512f"))) void lanes_sums(const float* c, int64_t n, int64_t lanes,
                                                   int64_t d, FactorView L, float* out) {
  lanes_sums_for<Vec512, 8>(c, n, lanes, d, L, out);
}

// ---- the columns kernel: one sample at a time, 16 factor columns as dot products ---------------

__attribute__((target("avx512f"))) void columns_sums(const float* c, int64_t n, int64_t d,
                                                     FactorView L, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const float* cr = c + r * d;
    __m512 sq = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < d; j0 += 16) {
      const int64_t columns = std::min<int64_t>(16, d - j0);
      const float* col = L.p + j0 * L.sj;  // column j0 + l starts at col + l * sj
      __m512 acc[16];
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) acc[l] = _mm512_setzero_ps();
      // Column by column, each read from its diagonal down in one sequential run (the block's
      // columns are adjacent in memory, so the whole block streams in order); the diagonal
      // chunk is masked to rows on or below the diagonal, and a zero mask reads nothing.
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) {
        if (l >= columns) break;
        const float* cl = col + l * L.sj;
        const __mmask16 rows0 = first_lanes16(d - j0);
        const __mmask16 lower = static_cast<__mmask16>(rows0 & ~first_lanes16(l));
        acc[l] = _mm512_mul_ps(_mm512_maskz_loadu_ps(lower, cl + j0),
                               _mm512_maskz_loadu_ps(rows0, cr + j0));
        for (int64_t i0 = j0 + 16; i0 < d; i0 += 16) {
          const __mmask16 rows = first_lanes16(d - i0);
          acc[l] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rows, cl + i0),
                                   _mm512_maskz_loadu_ps(rows, cr + i0), acc[l]);
        }
      }
      // Lane l of the sum of the transposed vectors is the sum of acc[l]'s lanes: (c L)[j0 + l].
      transpose16x16(acc);
      __m512 y = acc[0];
#pragma GCC unroll 16
      for (int a = 1; a < 16; ++a) y = _mm512_add_ps(y, acc[a]);
      sq = _mm512_fmadd_ps(y, y, sq);
    }
    out[r] = _mm512_reduce_add_ps(sq);
  }
}

// ---- centring ---------------------------------------------------------------------------------

// Rows from positions-contiguous x: 16 positions x 16 features at a time through registers, 16
// loads, a transpose and 16 stores instead of 256 scalar loads and stores. Masked loads read
// nothing past np or d.
__attribute__((target("avx512f"))) void rows_from_runs(const float* x, int64_t sb, int64_t,
                                                       int64_t sd, int64_t n, int64_t np, int64_t d,
                                                       const float* mean, int64_t mean_step,
                                                       float* dst, int64_t) {
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

// Lanes from feature-contiguous x (channels-last): 16 samples x 16 features of one position at a
// time, centred, transposed so that each vector holds one feature of 16 samples.
__attribute__((target("avx512f"))) void lanes_from_rows(const float* x, int64_t sb, int64_t sp,
                                                        int64_t, int64_t n, int64_t np, int64_t d,
                                                        const float* mean, int64_t mean_step,
                                                        float* dst, int64_t lanes) {
  for (int64_t k = 0; k < np; ++k)
    for (int64_t r0 = 0; r0 < n; r0 += 16)
      for (int64_t i0 = 0; i0 < d; i0 += 16) {
        const __mmask16 features = first_lanes16(d - i0);
        const __m512 m = _mm512_maskz_loadu_ps(features, mean + k * mean_step + i0);
        __m512 v[16];
        for (int a = 0; a < 16; ++a)  // sample r0 + a: features i0 ..
          v[a] = r0 + a < n
                     ? _mm512_sub_ps(
                           _mm512_maskz_loadu_ps(features, x + (r0 + a) * sb + k * sp + i0), m)
                     : _mm512_setzero_ps();
        transpose16x16(v);
        for (int64_t f = 0; f < 16 && i0 + f < d; ++f)
          _mm512_storeu_ps(dst + (k * d + i0 + f) * lanes + r0, v[f]);
      }
}

// Lanes from positions-contiguous x (channels-first): for each feature, 16 samples x 16 positions
// transposed so that each vector holds 16 samples at one position.
__attribute__((target("avx512f"))) void lanes_from_runs(const float* x, int64_t sb, int64_t,
                                                        int64_t sd, int64_t n, int64_t np,
                                                        int64_t d, const float* mean,
                                                        int64_t mean_step, float* dst,
                                                        int64_t lanes) {
  for (int64_t r0 = 0; r0 < n; r0 += 16)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t k0 = 0; k0 < np; k0 += 16) {
        const __mmask16 positions = first_lanes16(np - k0);
        __m512 v[16];
        for (int a = 0; a < 16; ++a)  // sample r0 + a: feature i at positions k0 ..
          v[a] = r0 + a < n ? _mm512_maskz_loadu_ps(positions, x + (r0 + a) * sb + i * sd + k0)
                            : _mm512_setzero_ps();
        transpose16x16(v);
        for (int64_t b = 0; b < 16 && k0 + b < np; ++b)
          _mm512_storeu_ps(dst + ((k0 + b) * d + i) * lanes + r0,
                           _mm512_sub_ps(v[b], _mm512_set1_ps(mean[(k0 + b) * mean_step + i])));
      }
}

}  // namespace

// Column-major copy for the lanes kernel: row-major factors transposed 16 x 16, others scalar.
float* to_columns(FactorView L, int64_t d, float* dst) {
  if (L.sj == 1) {
    rows_to_columns(L, d, dst);
  } else {
    copy_lower_to_columns(L, d, dst);
  }
  return dst;
}

Kernels kernels_avx512() {
  return {kW,          prepare,        rows_sums,       lanes_sums,
          to_columns,  rows_from_runs, lanes_from_rows, lanes_from_runs,
          columns_sums};
}

}  // namespace fastad::mahalanobis_kernels
