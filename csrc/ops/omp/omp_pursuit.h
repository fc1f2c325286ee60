// The per-signal steps of OMP that the CPU and CUDA kernels share (not part of the op's contract;
// see omp.h for that): the tie order, the support update with its stopping rules and the output.
//
// Written once, as host/device templates over how a thread reaches its arrays (plain pointers on
// the CPU, interleaved global scratch on CUDA), so that both devices follow omp.h's rules with the
// same float64 arithmetic in the same order. What differs stays in each kernel: the correlation
// update and the argmax (vectorised on the CPU).
#pragma once

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace fastad {
namespace omp_detail {

// scikit-learn's thresholds on float32 data: np.finfo(np.float32).eps.
constexpr double kEps = FLT_EPSILON;

// One signal's working memory. Doubles and Longs index like arrays (T& operator[](int64_t)).
template <typename Doubles, typename Longs>
struct Pursuit {
  Doubles alpha;        // (K) correlations of the residual with every atom
  Doubles L;            // (s * s) Cholesky factor of Gram[S, S], row-major, stride s
  Doubles z, gamma, w;  // (s) each: L z = Xy[S]; L^T gamma = z; a new row of L
  Longs support;        // (s) selected atoms, in order
  Longs order, where;   // (K) each: scikit-learn's atom order and its inverse (ties only)
};

// Among the atoms with |alpha| == m, the first in scikit-learn's order: it swaps each selected
// atom with the atom at position n_active, so positions < n hold S and the rest are atom order
// with those swaps applied. Only exact ties get here (duplicate atoms, a vanished residual).
template <typename P>
C10_HOST_DEVICE int64_t first_in_sklearn_order(const P& sc, int64_t n, int64_t K, double m) {
  for (int64_t i = 0; i < K; ++i) {
    sc.order[i] = i;
    sc.where[i] = i;
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t atom = sc.support[t], p = sc.where[atom], displaced = sc.order[t];
    sc.order[t] = atom;
    sc.order[p] = displaced;
    sc.where[atom] = t;
    sc.where[displaced] = p;
  }
  for (int64_t p = 0; p < K; ++p)
    if (::fabs(sc.alpha[sc.order[p]]) == m) return sc.order[p];
  return sc.order[0];  // unreachable: m is one of the values
}

// Step n of the pursuit once the argmax chose atom lam with |alpha[lam]| = m: stops (returns
// false) if lam is already selected, the residual vanished or lam depends linearly on the support;
// otherwise appends lam, extends the Cholesky factor by one row, solves L L^T gamma = Xy[S] and
// increments n. xy: the signal's K correlations; gram: the group's K x K Gram matrix.
template <typename P>
C10_HOST_DEVICE bool add_atom(const P& sc, const float* xy, const double* gram, int64_t K,
                              int64_t s, int64_t lam, double m, int64_t& n) {
  for (int64_t t = 0; t < n; ++t)
    if (sc.support[t] == lam) return false;  // selected twice
  if (m * m < kEps) return false;            // residual vanished
  const double* row = gram + lam * K;
  if (n > 0) {
    // w = L^-1 Gram[S, lam]: the new atom in the basis of the support's factor.
    double v = 0.0;
    for (int64_t t = 0; t < n; ++t) {
      double r = row[sc.support[t]];
      for (int64_t u = 0; u < t; ++u) r -= sc.L[t * s + u] * sc.w[u];
      const double wt = r / sc.L[t * s + t];
      sc.w[t] = wt;
      v += wt * wt;
    }
    const double pivot = row[lam] - v;
    if (!(pivot > kEps)) return false;  // lam depends linearly on S (NaN stops too)
    for (int64_t t = 0; t < n; ++t) sc.L[n * s + t] = sc.w[t];
    sc.L[n * s + n] = ::sqrt(pivot);
  } else {
    sc.L[0] = ::sqrt(row[lam]);
  }
  sc.support[n] = lam;
  // L z = Xy[S] gains one entry; L^T gamma = z is solved again in full.
  double r = xy[lam];
  for (int64_t t = 0; t < n; ++t) r -= sc.L[n * s + t] * sc.z[t];
  sc.z[n] = r / sc.L[n * s + n];
  ++n;
  for (int64_t t = n - 1; t >= 0; --t) {
    double g = sc.z[t];
    for (int64_t u = t + 1; u < n; ++u) g -= sc.L[u * s + t] * sc.gamma[u];
    sc.gamma[t] = g / sc.L[t * s + t];
  }
  return true;
}

// The n selected atoms and their coefficients into s slots; -1 and 0 fill the rest.
template <typename P>
C10_HOST_DEVICE void write_codes(const P& sc, int64_t n, int64_t s, int64_t* indices,
                                 float* coefs) {
  for (int64_t t = 0; t < s; ++t) {
    indices[t] = t < n ? sc.support[t] : -1;
    coefs[t] = t < n ? static_cast<float>(sc.gamma[t]) : 0.0f;
  }
}

}  // namespace omp_detail
}  // namespace fastad
