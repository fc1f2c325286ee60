// fastad::omp — Orthogonal Matching Pursuit of many signals over small per-group dictionaries.
//
//   omp(x, dictionary, n_nonzero) -> (indices, coefs)
//
//   x           (G, M, d)  float32, any strides: M signals in each of G independent groups.
//                          G = 0 or M = 0 gives empty (G, M, s) outputs
//   dictionary  (G, K, d)  float32, same device, any strides: each group's K atoms as rows, each of
//                          unit Euclidean norm (|norm - 1| <= 1e-3, checked; K >= 1, d >= 1)
//   n_nonzero   int s, 1 <= s <= min(K, d): the most atoms any signal uses
//   indices     (G, M, s)  int64 atoms of the group in the order they were selected; -1 after an
//                          early stop
//   coefs       (G, M, s)  float32 least-squares coefficients of those atoms; 0 where index is -1
//
// The result is scikit-learn's orthogonal_mp_gram(Gram, Xy, n_nonzero_coefs=s) with
// Gram = D D^T and Xy = D x (its Cholesky, "Gram" variant of OMP, Rubinstein et al. 2008), step
// for step, with the thresholds it uses for float32 data (eps = FLT_EPSILON = 1.19e-7):
//   alpha = Xy - Gram[:, S] gamma            correlations of the residual with every atom
//                                            (alpha = Xy before the first step, S = support)
//   lam   = argmax |alpha|                   equal values: the first in scikit-learn's order,
//                                            which is atom order with each selected atom swapped
//                                            to the front (selected atoms come first)
//   stop  if lam is already in S             ("selected the same atom twice": the residual is
//                                            numerically orthogonal to every atom)
//   stop  if alpha[lam]^2 < eps              (the residual vanished: a zero or exactly sparse
//                                            signal stops early, a zero signal at step 0)
//   stop  if Gram[lam, lam] - ||w||^2 <= eps with L w = Gram[S, lam]
//                                            (lam is numerically a linear combination of S:
//                                            the new Cholesky pivot would not be positive)
//   else  append lam to S, extend the Cholesky factor L of Gram[S, S] by one row, solve
//         L L^T gamma = Xy[S] (one forward step, one back substitution), stop when |S| = s.
// The early-stop thresholds are absolute, as in scikit-learn: they assume signals of roughly
// unit scale or more (a signal of norm ~1e-4 stops at once).
//
// Computation: Xy is one float32 GEMM per group (per block of signals, so working memory is a
// tile of at most 2^20 floats, never the whole (G, M, K)); Gram is computed in float64 (K x K x d
// per group, negligible), and every per-signal step (correlations, Cholesky factor, solves) runs in
// float64 in a per-thread scratch (K doubles and a few s x s arrays; nothing allocated per
// signal). Per signal and step the work is K n multiply-adds for alpha plus O(n^2) for the solves.
// Non-finite inputs give unspecified coefficients; indices stay in [-1, K).
//
// Reconstruction: x_hat[g, m] = sum_t coefs[g, m, t] dictionary[g, indices[g, m, t]] over the slots
// with indices >= 0 (fastad.ops.omp_reconstruct); the reconstruction error is ||x - x_hat||^2.
//
// Devices: CPU (omp_cpu.cpp) and CUDA (omp_cuda.cu), with the same rules; on CUDA one thread runs
// one signal's pursuit in float64 (scratch in global memory, the group's Gram in shared memory when
// K <= 78), or with FASTAD_OMP_CUDA_PATH=warp one warp, its lanes splitting the atoms (same codes).
// Xy comes from cuBLAS in float32 (TF32 only if the user allowed it for float32 matmuls), so
// near-ties may be decided differently from the CPU. On CUDA the unit-norm check runs on the device
// and its verdict is read back once (8 bytes): the op's only host synchronisation, there so that a
// bad dictionary raises the CPU's error (it also keeps the op out of CUDA graphs).
//
// Which devices each path has run on, and when: the table "Devices verified, per kernel" in
// benchmarks/RESULTS.md (one place for it).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "fastad/checks.h"

namespace fastad {

// Validates the arguments of omp the same way on every device (atom norms are checked by the
// kernel, from the Gram diagonal it computes anyway).
inline void check_omp_args(const at::Tensor& x, const at::Tensor& dictionary, int64_t n_nonzero) {
  check_dims(x, "x", 3, "(G, M, d)");
  check_dims(dictionary, "dictionary", 3, "(G, K, d)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type(),
                   " (cast it with .float())");
  TORCH_CHECK_TYPE(dictionary.scalar_type() == at::kFloat, "dictionary must be float32, got ",
                   dictionary.scalar_type(), " (cast it with .float())");
  check_same_device(x, "x", dictionary, "dictionary");
  TORCH_CHECK_VALUE(dictionary.size(0) == x.size(0),
                    "dictionary must hold one dictionary per group of x (G = ", x.size(0),
                    "), got shape ", dictionary.sizes());
  TORCH_CHECK_VALUE(dictionary.size(2) == x.size(2),
                    "dictionary atoms must have x's signal size d = ", x.size(2), ", got shape ",
                    dictionary.sizes());
  TORCH_CHECK_VALUE(dictionary.size(1) >= 1 && x.size(2) >= 1,
                    "dictionary must hold at least one atom (K >= 1) of at least one feature (d >= "
                    "1), got shape ",
                    dictionary.sizes());
  const int64_t most = std::min(dictionary.size(1), x.size(2));
  TORCH_CHECK_VALUE(
      n_nonzero >= 1 && n_nonzero <= most, "n_nonzero must be between 1 and min(K, d) = ", most,
      " (K = ", dictionary.size(1), " atoms, d = ", x.size(2), " features), got ", n_nonzero);
}

// How far from 1 a dictionary atom's norm may be (the message below writes it out).
constexpr double kAtomNormTolerance = 1e-3;

// The check of one atom's norm, worded once for the CPU and CUDA kernels, which find the first
// bad atom each their own way (NaN fails it).
inline void check_unit_atom(double norm, int64_t atom, int64_t group) {
  TORCH_CHECK_VALUE(std::fabs(norm - 1.0) <= kAtomNormTolerance,
                    "dictionary atoms must have unit norm (within 1e-3), got norm ", norm,
                    " for atom ", atom, " of group ", group,
                    " (normalise the rows: dictionary / dictionary.norm(dim=-1, keepdim=True))");
}

std::tuple<at::Tensor, at::Tensor> omp_cpu(const at::Tensor& x, const at::Tensor& dictionary,
                                           int64_t n_nonzero);

}  // namespace fastad
