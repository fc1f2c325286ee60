// CPU Orthogonal Matching Pursuit (Gram/Cholesky variant), scikit-learn's rules step for step.
//
// Why this shape: the only large work is the correlations of all signals with all atoms (Xy),
// an (M x d) by (d x K) matrix product, so it goes to ATen's GEMM a block of signals at a time
// (bounded memory). What is left per signal is small and sequential: s steps of an axpy-like
// update of K correlations from the contiguous Gram rows of the selected atoms (Gram is
// symmetric, so Gram[:, S] gamma is a sum of rows), an argmax, and s x s triangular solves.
// Those run in float64 (so that supports and coefficients match a float64 computation despite
// ill-conditioned supports) from a per-thread scratch, signals split with at::parallel_for.
//
// The instruction set (AVX2 or portable) is chosen per call; FASTAD_OMP_CPU_ISA=avx2|portable
// forces one (avx512 is accepted and means AVX2 here: the per-signal loops are short).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastad/cpu_isa.h"
#include "omp.h"
#include "omp_pursuit.h"

namespace fastad {
namespace {

using omp_detail::add_atom;
using omp_detail::first_in_sklearn_order;
using omp_detail::Pursuit;
using omp_detail::write_codes;

// Xy is computed this many floats at a time (4 MB): a tile, not the whole (G, M, K).
constexpr int64_t kXyTileFloats = int64_t{1} << 20;
// Signals are handed to threads in runs worth at least this many multiply-adds.
constexpr int64_t kMinMacsPerTask = int64_t{1} << 15;

// alpha[i] = xy[i] - sum_t gamma[t] gram[support[t] * K + i] for i < K; returns max_i |alpha[i]|.
using CorrelateFn = double (*)(const float* xy, const double* gram, const int64_t* support,
                               const double* gamma, int64_t n, int64_t K, double* alpha);
// The first i with |alpha[i]| == m, and how many other i have it too.
using FirstMaxFn = int64_t (*)(const double* alpha, int64_t K, double m, int64_t* others);

double correlate_portable(const float* xy, const double* gram, const int64_t* support,
                          const double* gamma, int64_t n, int64_t K, double* alpha) {
  for (int64_t i = 0; i < K; ++i) alpha[i] = xy[i];
  for (int64_t t = 0; t < n; ++t) {
    const double* row = gram + support[t] * K;
    const double c = gamma[t];
    for (int64_t i = 0; i < K; ++i) alpha[i] -= c * row[i];
  }
  double m = 0.0;
  for (int64_t i = 0; i < K; ++i) m = std::max(m, std::fabs(alpha[i]));
  return m;
}

int64_t first_max_portable(const double* alpha, int64_t K, double m, int64_t* others) {
  int64_t first = -1, count = 0;
  for (int64_t i = 0; i < K; ++i)
    if (std::fabs(alpha[i]) == m) {
      if (first < 0) first = i;
      ++count;
    }
  *others = count - 1;
  return first;
}

__attribute__((target("avx2,fma"))) inline __m256d abs_pd(__m256d v) {
  return _mm256_andnot_pd(_mm256_set1_pd(-0.0), v);
}

__attribute__((target("avx2,fma"))) double correlate_avx2(const float* xy, const double* gram,
                                                          const int64_t* support,
                                                          const double* gamma, int64_t n, int64_t K,
                                                          double* alpha) {
  __m256d vmax = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 4 <= K; i += 4) {  // each block of 4 atoms finished before the next: one pass
    __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(xy + i));
    for (int64_t t = 0; t < n; ++t)
      a = _mm256_fnmadd_pd(_mm256_set1_pd(gamma[t]), _mm256_loadu_pd(gram + support[t] * K + i), a);
    _mm256_storeu_pd(alpha + i, a);
    vmax = _mm256_max_pd(vmax, abs_pd(a));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, vmax);
  double m = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
  for (; i < K; ++i) {
    double a = xy[i];
    for (int64_t t = 0; t < n; ++t) a = std::fma(-gamma[t], gram[support[t] * K + i], a);
    alpha[i] = a;
    m = std::max(m, std::fabs(a));
  }
  return m;
}

__attribute__((target("avx2,fma"))) int64_t first_max_avx2(const double* alpha, int64_t K, double m,
                                                           int64_t* others) {
  const __m256d vm = _mm256_set1_pd(m);
  int64_t first = -1, count = 0, i = 0;
  for (; i + 4 <= K; i += 4) {
    const int mask =
        _mm256_movemask_pd(_mm256_cmp_pd(abs_pd(_mm256_loadu_pd(alpha + i)), vm, _CMP_EQ_OQ));
    if (mask) {
      if (first < 0) first = i + __builtin_ctz(static_cast<unsigned>(mask));
      count += __builtin_popcount(static_cast<unsigned>(mask));
    }
  }
  for (; i < K; ++i)
    if (std::fabs(alpha[i]) == m) {
      if (first < 0) first = i;
      ++count;
    }
  *others = count - 1;
  return first;
}

struct Kernels {
  CorrelateFn correlate;
  FirstMaxFn first_max;
};

Kernels kernels_for(CpuIsa isa) {
  if (isa == CpuIsa::kPortable) return {correlate_portable, first_max_portable};
  return {correlate_avx2, first_max_avx2};
}

// One thread's working memory, sized once: nothing is allocated per signal.
struct Scratch {
  Scratch(int64_t K, int64_t s) : doubles(K + s * s + 3 * s), longs(s + 2 * K) {}
  std::vector<double> doubles;
  std::vector<int64_t> longs;
  // The arrays of omp_pursuit.h's Pursuit, carved out of the two buffers.
  Pursuit<double*, int64_t*> view(int64_t K, int64_t s) {
    double* d = doubles.data();
    int64_t* l = longs.data();
    return {d, d + K, d + K + s * s, d + K + s * s + s, d + K + s * s + 2 * s, l, l + s, l + s + K};
  }
};

// OMP of one signal from its correlations xy (K floats) and the group's Gram (K x K doubles);
// writes s indices and coefficients. The steps after the argmax are omp_pursuit.h's.
void omp_one(const Kernels& kernels, const float* xy, const double* gram, int64_t K, int64_t s,
             const Pursuit<double*, int64_t*>& sc, int64_t* indices, float* coefs) {
  int64_t n = 0;
  while (n < s) {
    const double m = kernels.correlate(xy, gram, sc.support, sc.gamma, n, K, sc.alpha);
    int64_t others = 0;
    int64_t lam = kernels.first_max(sc.alpha, K, m, &others);
    if (lam < 0) break;  // m is NaN: no atom compares equal (non-finite input)
    if (others > 0) lam = first_in_sklearn_order(sc, n, K, m);
    if (!add_atom(sc, xy, gram, K, s, lam, m, n)) break;
  }
  write_codes(sc, n, s, indices, coefs);
}

// Refuses dictionaries whose atoms are not of unit norm, from the Gram diagonals (float64).
void check_unit_atoms(const at::Tensor& gram) {
  const int64_t groups = gram.size(0), K = gram.size(1);
  const double* gp = gram.const_data_ptr<double>();
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = 0; k < K; ++k) {
      check_unit_atom(std::sqrt(gp[(g * K + k) * K + k]), k, g);
    }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> omp_cpu(const at::Tensor& x, const at::Tensor& dictionary,
                                           int64_t n_nonzero) {
  check_omp_args(x, dictionary, n_nonzero);
  const int64_t groups = x.size(0), M = x.size(1), K = dictionary.size(1), s = n_nonzero;
  at::Tensor indices = at::empty({groups, M, s}, x.options().dtype(at::kLong));
  at::Tensor coefs = at::empty({groups, M, s}, x.options());
  if (groups == 0) return {indices, coefs};
  const at::Tensor dict64 = dictionary.to(at::kDouble);
  const at::Tensor gram = at::matmul(dict64, dict64.mT()).contiguous();  // (G, K, K)
  check_unit_atoms(gram);
  if (M == 0) return {indices, coefs};
  const Kernels kernels = kernels_for(cpu_isa("FASTAD_OMP_CPU_ISA"));
  const double* gp = gram.const_data_ptr<double>();
  int64_t* ip = indices.mutable_data_ptr<int64_t>();
  float* cp = coefs.mutable_data_ptr<float>();
  const at::Tensor atoms_t = dictionary.mT();  // (G, d, K)

  // Tiles of Xy: whole groups when a group's (M, K) is small (MLF-SC: many tiny dictionaries),
  // else blocks of one group's signals.
  const int64_t group_floats = M * K;
  const int64_t groups_per_tile = std::max<int64_t>(1, kXyTileFloats / group_floats);
  const int64_t signals_per_tile =
      groups_per_tile > 1 ? M : std::max<int64_t>(1, kXyTileFloats / K);
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerTask / (K * s * (s + 1) / 2 + s * s * s));
  for (int64_t g0 = 0; g0 < groups; g0 += groups_per_tile) {
    const int64_t gn = std::min(groups_per_tile, groups - g0);
    for (int64_t m0 = 0; m0 < M; m0 += signals_per_tile) {
      const int64_t mn = std::min(signals_per_tile, M - m0);
      const at::Tensor xy =  // (gn, mn, K): every signal's correlations with its group's atoms
          at::matmul(x.narrow(0, g0, gn).narrow(1, m0, mn), atoms_t.narrow(0, g0, gn)).contiguous();
      const float* xyp = xy.const_data_ptr<float>();
      at::parallel_for(0, gn * mn, grain, [&](int64_t begin, int64_t end) {
        Scratch storage(K, s);
        const auto scratch = storage.view(K, s);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t g = g0 + r / mn, m = m0 + r % mn;
          const int64_t out = (g * M + m) * s;
          omp_one(kernels, xyp + r * K, gp + g * K * K, K, s, scratch, ip + out, cp + out);
        }
      });
    }
  }
  return {indices, coefs};
}

TORCH_LIBRARY_IMPL(fastad, CPU, m) { m.impl("omp", &omp_cpu); }

}  // namespace fastad
