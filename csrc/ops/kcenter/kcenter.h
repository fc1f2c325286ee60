// fastad::kcenter_greedy — greedy k-center (farthest-point) coreset selection, Gonzalez's rule.
//
//   kcenter_greedy(x, k, start) -> (indices, radii)
//
//   x        (N, D)  float32 | float16 | bfloat16, any strides; N >= 1, D >= 1
//   k        int, 1 <= k <= N: number of rows to select
//   start    int, 0 <= start < N: the first selected row
//   indices  (k,)    int64 rows of x in selection order, all distinct; indices[0] = start
//   radii    (k,)    float32; radii[i] = Euclidean distance from x[indices[i]] to its nearest row
//                    among indices[0..i) at the moment it was chosen; radii[0] = +inf. The
//                    sequence never increases, and every row of x lies within radii[k-1] of one
//                    of indices[0..k-1): the coverage radius of the selection (up to its last row).
//
// Rule: after indices[0..i) are chosen, indices[i] is the unselected row whose distance to its
// nearest chosen row is largest, equal distances going to the lowest row index. Duplicates of
// chosen rows are at distance 0, so they come once every row at a positive distance has been
// chosen, lowest index first; a chosen row is never chosen again.
//
// Computation is float32 (half inputs are widened), each distance a direct sum of squared
// differences (no norm expansion), so duplicates tie exactly; rows whose distances differ only in
// float32 rounding (near-ties) may come in either order, and CPU and CUDA, which sum in different
// orders, may differ there. Extra memory is O(N) plus the (k, D) chosen rows, never N x k, after
// one contiguous copy of x where it is not already contiguous (and float32, on the CPU). On the
// CPU, non-finite values and distances that overflow float32 are rejected; on CUDA (where checking
// would cost a host synchronisation) they give an unspecified selection whose indices are still
// distinct rows of x.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "fastad/checks.h"

namespace fastad {

// Validates the arguments of kcenter_greedy the same way on every device.
inline void check_kcenter_args(const at::Tensor& x, int64_t k, int64_t start) {
  check_dims(x, "x", 2, "(N, D)");
  check_float_input(x, "x");
  const int64_t n = x.size(0);
  TORCH_CHECK_VALUE(n >= 1, "x must hold at least one row, got N = 0");
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must have at least one feature column, got D = 0");
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "k must be between 1 and the number of rows of x (", n,
                    "), got k = ", k);
  TORCH_CHECK_VALUE(start >= 0 && start < n, "start must be a row of x, between 0 and ", n - 1,
                    ", got start = ", start);
}

std::tuple<at::Tensor, at::Tensor> kcenter_greedy_cpu(const at::Tensor& x, int64_t k,
                                                      int64_t start);
std::tuple<at::Tensor, at::Tensor> kcenter_greedy_cuda(const at::Tensor& x, int64_t k,
                                                       int64_t start);

}  // namespace fastad
