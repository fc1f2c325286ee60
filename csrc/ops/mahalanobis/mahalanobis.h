// fastad::mahalanobis — squared Mahalanobis distance of every sample at every position.
//
//   mahalanobis(x, mean, L) -> out
//
//   x     (B, P, D)  float32, any strides; B samples (images) at P positions (patches), D features.
//                    B = 0 or P = 0 gives an empty (B, P) result; D >= 1
//   mean  (P, D) or (1, D)  float32, same device: each position's mean, or one shared by all
//   L     (Q, D, D)  float32, same device, Q = P or Q = 1: the lower-triangular Cholesky factor of
//                    each position's precision (inverse covariance), or one shared by all
//                    positions. Only the lower triangle (diagonal included) is read; the upper
//                    triangle is never read, so whatever it holds (NaN included) changes nothing
//   out   (B, P)     float32, contiguous
//
//   out[b, p] = || L[q]^T (x[b, p] - mean[m]) ||^2
//             = sum_j ( sum_{i >= j} L[q, i, j] (x[b, p, i] - mean[m, i]) )^2
//   with q = p if Q = P else 0, m = p if mean has P rows else 0 (the two broadcast independently;
//   when P = 1 both readings agree).
//
// Computation is float32 with float32 accumulation; the centred differences are formed once
// (one rounding) and every inner product runs over i in ascending order, so the result does not
// depend on the layout of any argument. Each position's factor is read once for its whole batch
// (once per 64 samples on the CPU, per 128 on CUDA); there is no (B, P, D) difference tensor.
//
// Layouts, CPU: nothing is copied per call. x, mean and L are read through their strides. L is
// read in place when row-major (stride 1 along j: what .contiguous() gives) or column-major
// (stride 1 along i: what torch.linalg.cholesky returns, i.e. the transpose of a row-major upper
// factor); the two are equally fast. A factor with neither stride 1 is copied one position at a
// time into a thread's buffer. x is fastest with contiguous features (channels-last CNN output)
// and fast with contiguous positions (channels-first). Working memory per thread: a tile of
// centred values (at most max(2^18, 64 D) floats) and one factor's worth of scratch (at most
// D^2 floats).
// Layouts, CUDA: x, mean and L are made contiguous (a copy when they are not); per block, a
// 32 x 32 tile of the factor lives in shared memory.
//
// Values are not checked (on CUDA that would cost a host synchronisation): a NaN or Inf in
// x[b, p] gives a non-finite out[b, p] only; one in mean[m] or in the lower triangle of L[q]
// gives non-finite results at the positions that use it. Finite inputs whose products exceed
// float32's range give +inf or NaN there.
//
// Which devices each path has run on, and when: the table "Devices verified, per kernel" in
// benchmarks/RESULTS.md. The CPU kernels are forced one by one in the tests with
// FASTAD_MAHALANOBIS_CPU_ISA=avx512|avx2|portable.
#pragma once

#include <ATen/ATen.h>

#include "fastad/checks.h"

namespace fastad {

namespace mahalanobis_detail {
// The op computes in float32 only: a float64 precision would silently lose its accuracy.
inline void check_float32(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type(),
                   " (cast it with .float())");
}
}  // namespace mahalanobis_detail

// Validates the arguments of mahalanobis the same way on every device.
inline void check_mahalanobis_args(const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& L) {
  check_dims(x, "x", 3, "(B, P, D)");
  check_dims(mean, "mean", 2, "(P, D) or (1, D)");
  check_dims(L, "L", 3, "(Q, D, D) with Q = P or 1");
  mahalanobis_detail::check_float32(x, "x");
  mahalanobis_detail::check_float32(mean, "mean");
  mahalanobis_detail::check_float32(L, "L");
  check_same_device(x, "x", mean, "mean");
  check_same_device(x, "x", L, "L");
  const int64_t p = x.size(1), d = x.size(2);
  TORCH_CHECK_VALUE(d >= 1, "x must have at least one feature (D >= 1), got shape ", x.sizes());
  TORCH_CHECK_VALUE(mean.size(1) == d, "mean must have D = ", d,
                    " columns (x's feature size), got shape ", mean.sizes());
  TORCH_CHECK_VALUE(mean.size(0) == p || mean.size(0) == 1, "mean must have P = ", p,
                    " rows (one per position of x) or 1 row (shared), got shape ", mean.sizes());
  TORCH_CHECK_VALUE(L.size(1) == d && L.size(2) == d, "L must have shape (Q, D, D) with D = ", d,
                    " (x's feature size), got shape ", L.sizes());
  TORCH_CHECK_VALUE(L.size(0) == p || L.size(0) == 1, "L must hold Q = P = ", p,
                    " factors (one per position of x) or Q = 1 (shared), got Q = ", L.size(0));
}

at::Tensor mahalanobis_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& L);
at::Tensor mahalanobis_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& L);

}  // namespace fastad
