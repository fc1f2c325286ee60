// Input checks shared by every op: one place that words errors the way users read them, as
// fastad.checks does in Python ("<name> must be <what>, got <found>").
//
// Which Python exception a failed check becomes: TORCH_CHECK_TYPE (TypeError) for a wrong dtype,
// TORCH_CHECK_VALUE (ValueError) for every other bad argument (shape, size, device, values, an
// environment switch); plain TORCH_CHECK (RuntimeError) only for what no caller can cause.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace fastad {

// "query" must have `dims` dimensions.
inline void check_dims(const at::Tensor& t, const char* name, int64_t dims, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dims, name, " must be a ", dims, "-D tensor of shape ", shape,
                    ", got ", t.dim(), "-D with shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK_VALUE(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ",
                    a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b,
                             const char* bn) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), an, " and ", bn,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// Floating types every kernel accepts: float32, and float16/bfloat16 which are computed in float32.
inline void check_float_input(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", s,
                   (s == at::kDouble ? " (cast it with .float())" : ""));
}

}  // namespace fastad
