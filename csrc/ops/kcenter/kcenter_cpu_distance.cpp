// Direct squared distances for the CPU k-center kernel: an AVX-512 kernel, an AVX2 one and a
// portable one, chosen once at run time (the library is built without -march=native).
//
// Why the shape: the lazy greedy (kcenter_cpu.cpp) evaluates one row against a run of chosen
// rows that sit contiguously in a small buffer, so the kernel keeps the row's chunk in a register
// and streams several chosen rows past it, one accumulator each, enough of them to hide the FMA
// latency. Each pair's arithmetic is the same sequence whatever the batch size, so a pair's value
// never depends on the batch it was computed in.
#include "kcenter_cpu_distance.h"

// GCC 12 reports its own _mm512_undefined_* placeholders as uninitialised wherever AVX-512
// intrinsics are inlined (GCC bug 105593, fixed in GCC 13); the warnings point into the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>

#include "fastad/cpu_isa.h"
#include "fastad/distance.h"

namespace fastad {
namespace kcenter_detail {
namespace {

// ---- AVX-512: 16 lanes, masked tail ------------------------------------------------------------

__attribute__((target("avx512f"))) inline float hsum16(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
}

// Squared distances from `point` to rows[0..B) (row stride d) into out[0..B).
template <int B>
__attribute__((target("avx512f"))) inline void batch_avx512(const float* point, const float* rows,
                                                            int64_t d, float* out) {
  __m512 acc[B];
  for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512 p = _mm512_loadu_ps(point + j);
    for (int b = 0; b < B; ++b) {
      const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(rows + b * d + j), p);
      acc[b] = _mm512_fmadd_ps(x, x, acc[b]);
    }
  }
  if (j < d) {  // zeros in the masked lanes add exactly nothing
    const __mmask16 m = static_cast<__mmask16>((1u << (d - j)) - 1u);
    const __m512 p = _mm512_maskz_loadu_ps(m, point + j);
    for (int b = 0; b < B; ++b) {
      const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, rows + b * d + j), p);
      acc[b] = _mm512_fmadd_ps(x, x, acc[b]);
    }
  }
  for (int b = 0; b < B; ++b) out[b] = hsum16(acc[b]);
}

__attribute__((target("avx512f"))) float min_avx512(const float* point, const float* rows,
                                                    int64_t count, int64_t d, float current) {
  constexpr int kBatch = 8;  // 8 independent FMA chains cover the latency of two FMA ports
  float out[kBatch];
  int64_t c = 0;
  for (; c + kBatch <= count; c += kBatch) {
    batch_avx512<kBatch>(point, rows + c * d, d, out);
    for (int b = 0; b < kBatch; ++b) current = std::min(current, out[b]);
  }
  for (; c < count; ++c) {
    batch_avx512<1>(point, rows + c * d, d, out);
    current = std::min(current, out[0]);
  }
  return current;
}

// Four points against runs of four rows: 16 accumulators, each row chunk loaded once for four
// points and each point chunk once for four rows. The 16 sums are reduced together by a
// transposition network that adds the same lane pairs in the same order as hsum16 (lane i with
// i+8, then i+4, i+2, i+1; float addition is commutative), so every pair gets hsum16's bits.
// Output lane 4 c + p holds point p's distance to row c.
__attribute__((target("avx512f"))) inline __m512 reduce16(const __m512* a) {
  __m512 v[8], u[4], s[2];
  for (int m = 0; m < 8; ++m)  // lanes i and i+8 of each accumulator
    v[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // then i and i+4
    u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)  // then i and i+2
    s[m] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * m], u[2 * m + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * m], u[2 * m + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD));
}

__attribute__((target("avx512f"))) void min4_avx512(const float* const points[4], const float* rows,
                                                    int64_t count, int64_t d, float bounds[4]) {
  const int64_t full = d & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (d - full)) - 1u);
  __m512 best = _mm512_set1_ps(__builtin_inff());
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) {
    const float* r = rows + c * d;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < full; j += 16) {
      __m512 p[4];
      for (int q = 0; q < 4; ++q) p[q] = _mm512_loadu_ps(points[q] + j);
      for (int b = 0; b < 4; ++b) {
        const __m512 y = _mm512_loadu_ps(r + b * d + j);
        for (int q = 0; q < 4; ++q) {
          const __m512 x = _mm512_sub_ps(y, p[q]);
          acc[4 * q + b] = _mm512_fmadd_ps(x, x, acc[4 * q + b]);
        }
      }
    }
    if (tail) {
      __m512 p[4];
      for (int q = 0; q < 4; ++q) p[q] = _mm512_maskz_loadu_ps(tail, points[q] + full);
      for (int b = 0; b < 4; ++b) {
        const __m512 y = _mm512_maskz_loadu_ps(tail, r + b * d + full);
        for (int q = 0; q < 4; ++q) {
          const __m512 x = _mm512_sub_ps(y, p[q]);
          acc[4 * q + b] = _mm512_fmadd_ps(x, x, acc[4 * q + b]);
        }
      }
    }
    best = _mm512_min_ps(best, reduce16(acc));
  }
  // Minimum over the four row slots: lanes p, 4+p, 8+p, 12+p end in lane p.
  best = _mm512_min_ps(best, _mm512_shuffle_f32x4(best, best, 0x4E));
  best = _mm512_min_ps(best, _mm512_shuffle_f32x4(best, best, 0xB1));
  alignas(64) float out[16];
  _mm512_store_ps(out, best);
  for (int q = 0; q < 4; ++q) {
    bounds[q] = std::min(bounds[q], out[q]);
    if (c < count) bounds[q] = min_avx512(points[q], rows + c * d, count - c, d, bounds[q]);
  }
}

// ---- AVX2: 8 lanes, masked tail -----------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
}

template <int B>
__attribute__((target("avx2,fma"))) inline void batch_avx2(const float* point, const float* rows,
                                                           int64_t d, float* out) {
  __m256 acc[B];
  for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 p = _mm256_loadu_ps(point + j);
    for (int b = 0; b < B; ++b) {
      const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(rows + b * d + j), p);
      acc[b] = _mm256_fmadd_ps(x, x, acc[b]);
    }
  }
  if (j < d) {
    alignas(32) static const int kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                               0,  0,  0,  0,  0,  0,  0,  0};
    const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + 8 - (d - j)));
    const __m256 p = _mm256_maskload_ps(point + j, m);
    for (int b = 0; b < B; ++b) {
      const __m256 x = _mm256_sub_ps(_mm256_maskload_ps(rows + b * d + j, m), p);
      acc[b] = _mm256_fmadd_ps(x, x, acc[b]);
    }
  }
  for (int b = 0; b < B; ++b) out[b] = hsum8(acc[b]);
}

__attribute__((target("avx2,fma"))) float min_avx2(const float* point, const float* rows,
                                                   int64_t count, int64_t d, float current) {
  constexpr int kBatch = 4;
  float out[kBatch];
  int64_t c = 0;
  for (; c + kBatch <= count; c += kBatch) {
    batch_avx2<kBatch>(point, rows + c * d, d, out);
    for (int b = 0; b < kBatch; ++b) current = std::min(current, out[b]);
  }
  for (; c < count; ++c) {
    batch_avx2<1>(point, rows + c * d, d, out);
    current = std::min(current, out[0]);
  }
  return current;
}

// ---- Portable -----------------------------------------------------------------------------------

float min_portable(const float* point, const float* rows, int64_t count, int64_t d, float current) {
  for (int64_t c = 0; c < count; ++c)
    current = std::min(current, squared_distance_portable(point, rows + c * d, d));
  return current;
}

template <float (*Min1)(const float*, const float*, int64_t, int64_t, float)>
void min4_by_rows(const float* const points[4], const float* rows, int64_t count, int64_t d,
                  float bounds[4]) {
  for (int q = 0; q < 4; ++q) bounds[q] = Min1(points[q], rows, count, d, bounds[q]);
}

}  // namespace

DistanceKernels distance_kernels() {
  switch (cpu_isa("FASTAD_KCENTER_CPU_ISA")) {
    case CpuIsa::kAvx512:
      return {"avx512", min_avx512, min4_avx512};
    case CpuIsa::kAvx2:
      return {"avx2", min_avx2, min4_by_rows<min_avx2>};
    default:
      return {"portable", min_portable, min4_by_rows<min_portable>};
  }
}

}  // namespace kcenter_detail
}  // namespace fastad
