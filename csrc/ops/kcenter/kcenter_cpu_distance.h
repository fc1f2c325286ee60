// Squared Euclidean distances of the CPU k-center kernel (not part of the op's contract; see
// kcenter.h for that).
//
// Every distance is a direct float32 sum of squared differences whose rounding depends only on
// the two rows, D and the instruction set, never on which function or batch computed it: the same
// pair always gets the same bits, so duplicate rows tie exactly and the greedy's tie rule (lowest
// index) holds.
#pragma once

#include <cstdint>

namespace fastad {
namespace kcenter_detail {

struct DistanceKernels {
  const char* isa;  // "avx512", "avx2" or "portable"
  // min(current, squared distance from `point` to each of the `count` contiguous rows of length d
  // starting at `rows`).
  float (*min1)(const float* point, const float* rows, int64_t count, int64_t d, float current);
  // The same for four points against the same run of rows: bounds[i] = min(bounds[i], ...). The
  // AVX-512 kernel reads each run row once for all four points, a quarter of the cache traffic of
  // four single calls, with the same results.
  void (*min4)(const float* const points[4], const float* rows, int64_t count, int64_t d,
               float bounds[4]);
};

// The best kernels for this CPU (the library is built without -march=native). The environment
// variable FASTAD_KCENTER_CPU_ISA=avx2 or =portable forces a lesser set, so that tests reach every
// kernel on one machine; a set the CPU lacks is never used.
DistanceKernels distance_kernels();

}  // namespace kcenter_detail
}  // namespace fastad
