// fastad::knn — exact k nearest neighbours in Euclidean distance.
//
//   knn(query, bank, k, squared, prepared=None) -> (distances, indices)
//   knn_prepare(bank) -> prepared
//
//   query      (M, D)  float32 | float16 | bfloat16, any strides; M may be 0
//   bank       (N, D)  same dtype and device as query; N >= 1
//   k          int, 1 <= k <= N
//   squared    bool: return squared distances instead of plain ones
//   distances  (M, k)  float32, ascending along each row, never negative
//   indices    (M, k)  int64 rows of `bank`; equal distances are ordered by the lower index
//   prepared   optional uint8 (bytes,) from knn_prepare(bank) of this very bank, unchanged since
//
// knn_prepare does once the per-bank work the CPU screen otherwise repeats on every call (the
// bank's int8 coding and the terms of its bound), for a bank that is searched many times. The
// result is a plain byte tensor on the bank's device: empty where nothing can be prepared (CUDA,
// D < 8, no AVX2, non-finite bank values), which knn accepts for any bank. Results are the same
// with or without it. knn checks a non-empty one against the bank on every call (shape, layout,
// a fingerprint of sampled rows) and raises when it belongs to another bank.
//
// Computation is float32 (half inputs are widened). Working memory is one tile of the distance
// matrix plus O((M + N) * D) packed copies; the M x N matrix is never materialised.
// Non-finite inputs give unspecified distances, but indices stay within [0, N).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "fastad/checks.h"

namespace fastad {

// Validates the arguments of knn the same way on every device.
inline void check_knn_bank(const at::Tensor& bank) {
  check_dims(bank, "bank", 2, "(N, D)");
  check_float_input(bank, "bank");
  TORCH_CHECK_VALUE(bank.size(0) >= 1, "bank must hold at least one row, got N = 0");
}

inline void check_knn_args(const at::Tensor& query, const at::Tensor& bank, int64_t k) {
  check_dims(query, "query", 2, "(M, D)");
  check_knn_bank(bank);
  check_same_device(query, "query", bank, "bank");
  check_float_input(query, "query");
  check_same_dtype(query, "query", bank, "bank");
  TORCH_CHECK_VALUE(query.size(1) == bank.size(1),
                    "query and bank must have the same feature size D, got ",
                    "query D = ", query.size(1), " and bank D = ", bank.size(1));
  TORCH_CHECK_VALUE(k >= 1 && k <= bank.size(0),
                    "k must be between 1 and the number of bank rows (", bank.size(0),
                    "), got k = ", k);
}

// The CUDA kernel codes nothing per bank, so its prepared bank is empty (knn_prepare_cuda); and
// the query reaches the CUDA kernel on the CPU only when `prepared` alone is a CUDA tensor (it
// takes part in dispatch): fastad.ops.knn refuses that first, a direct torch.ops call lands here.
inline void check_knn_cuda_prepared(const at::Tensor& query,
                                    const std::optional<at::Tensor>& prepared) {
  TORCH_CHECK_VALUE(!prepared.has_value() || prepared->numel() == 0,
                    "prepared must be fastad.ops.knn_prepare(bank) of this CUDA bank, which is "
                    "empty; got ",
                    prepared.has_value() ? prepared->numel() : 0, " bytes (a CPU bank's?)");
  TORCH_CHECK_VALUE(query.is_cuda(), "query and bank must be on prepared's device (",
                    prepared.has_value() ? prepared->device() : query.device(), "), got ",
                    query.device());
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& bank,
                                           int64_t k, bool squared,
                                           const std::optional<at::Tensor>& prepared);
std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query, const at::Tensor& bank,
                                            int64_t k, bool squared,
                                            const std::optional<at::Tensor>& prepared);
at::Tensor knn_prepare_cpu(const at::Tensor& bank);

}  // namespace fastad
