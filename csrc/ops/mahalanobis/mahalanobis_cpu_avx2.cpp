// AVX2 and portable pieces of the CPU Mahalanobis op. AVX2: panels of 8 factor columns and the
// rows kernel (up to 8 samples by one panel), and the lanes kernel (16 samples by 6 columns, from
// mahalanobis_cpu_lanes.inc). Portable: the definition, row by row of a dense row-major factor.
// See mahalanobis_cpu_kernels.h.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "mahalanobis_cpu_kernels.h"

namespace fastad::mahalanobis_kernels {
namespace {

constexpr int64_t kW = 8;

// Lanes 0 .. count-1 as a maskload mask (count clamped to [0, 8]); masked lanes are not read.
__attribute__((target("avx2,fma"))) inline __m256i first_lanes8(int64_t count) {
  const int n = static_cast<int>(std::clamp<int64_t>(count, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) const float* prepare_avx2(FactorView L, int64_t d, float* dst) {
  if (L.sj != 1) {
    pack_strided(L, d, kW, dst);
    return dst;
  }
  for (int64_t i = 0; i < d; ++i)
    for (int64_t k = 0; kW * k <= i; ++k)
      _mm256_storeu_ps(dst + panel_offset(k, d, kW) + (i - kW * k) * kW,
                       _mm256_maskload_ps(L.p + i * L.si + kW * k, first_lanes8(i + 1 - kW * k)));
  return dst;
}

// The loops over R are unrolled by pragma so that GCC keeps the accumulators in registers.
template <int R>
__attribute__((target("avx2,fma"))) void rows_panel(const float* c, int64_t d, const float* panel,
                                                    int64_t j0, float* sq) {
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = j0; i < d; ++i) {
    const __m256 l = _mm256_loadu_ps(panel + (i - j0) * kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(c + r * d + i), l, acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    _mm256_storeu_ps(sq + 8 * r, _mm256_fmadd_ps(acc[r], acc[r], _mm256_loadu_ps(sq + 8 * r)));
}

using RowsPanelFn = void (*)(const float*, int64_t, const float*, int64_t, float*);

constexpr int kRows = 8;  // 8 accumulators + the panel row + a broadcast: 10 of 16 registers

template <std::size_t... R>
constexpr std::array<RowsPanelFn, sizeof...(R)> rows_panels(std::index_sequence<R...>) {
  return {&rows_panel<static_cast<int>(R) + 1>...};
}

__attribute__((target("avx2,fma"))) void rows_sums_avx2(const float* c, int64_t n, int64_t d,
                                                        const float* packed, float* sq,
                                                        float* out) {
  static constexpr auto kPanels = rows_panels(std::make_index_sequence<kRows>{});
  std::fill(sq, sq + 8 * n, 0.0f);
  for (int64_t k = 0; kW * k < d; ++k) {
    const float* panel = packed + panel_offset(k, d, kW);
    for (int64_t r0 = 0; r0 < n; r0 += kRows)
      kPanels[std::min<int64_t>(kRows, n - r0) - 1](c + r0 * d, d, panel, kW * k, sq + 8 * r0);
  }
  for (int64_t r = 0; r < n; ++r) {
    const float* s = sq + 8 * r;
    out[r] = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
  }
}

// ---- portable -----------------------------------------------------------------------------------

// A dense row-major factor: L itself when it is one, else its lower triangle copied (the upper
// one is never read either way).
const float* prepare_portable(FactorView L, int64_t d, float* dst) {
  if (L.sj == 1 && L.si == d) return L.p;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j <= i; ++j) dst[i * d + j] = L.p[i * L.si + j * L.sj];
  return dst;
}

// y: d floats of scratch.
void rows_sums_portable(const float* c, int64_t n, int64_t d, const float* L, float* y,
                        float* out) {
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

// ---- the lanes kernel: 2 vectors of 8 samples by 6 columns of a column-major factor -------------

// The traits and the kernel compile for this instruction set (the intrinsics must inline).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
struct Vec256 {
  using type = __m256;
  static constexpr int kWidth = 8;
  static type zero() { return _mm256_setzero_ps(); }
  static type load(const float* p) { return _mm256_load_ps(p); }
  static type set1(float x) { return _mm256_set1_ps(x); }
  static type fmadd(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, type x) { _mm256_store_ps(p, x); }
};
#include "mahalanobis_cpu_lanes.inc"
#pragma GCC pop_options

// 2 x 6 accumulators, 2 sample vectors, 1 broadcast of 16 ymm registers.
__attribute__((target("avx2,fma"))) void lanes_sums_avx2(const float* c, int64_t n, int64_t lanes,
                                                         int64_t d, FactorView L, float* out) {
  lanes_sums_for<Vec256, 6>(c, n, lanes, d, L, out);
}

// Column-major copy for the lanes kernel (scalar: once per position, against D^2 B / 2 FMAs).
float* to_columns_portable(FactorView L, int64_t d, float* dst) {
  copy_lower_to_columns(L, d, dst);
  return dst;
}

}  // namespace

// The lanes layout is centred by the driver's scalar loop here (no AVX2 transposes yet): still
// 17.3 -> 13.2 ms against the rows kernel at PaDiM's shape (B 32, P 3136, D 100), AVX2 forced on
// an AVX-512 Xeon.
Kernels kernels_avx2() {
  return {kW,      prepare_avx2, rows_sums_avx2, lanes_sums_avx2, to_columns_portable,
          nullptr, nullptr,      nullptr,        nullptr};
}

Kernels kernels_portable() {
  return {0,       prepare_portable, rows_sums_portable, nullptr, nullptr, nullptr, nullptr,
          nullptr, nullptr};
}

}  // namespace fastad::mahalanobis_kernels
