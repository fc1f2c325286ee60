// Warp-level building blocks shared by the CUDA kernels (kNN, k-center). Device code: include it
// from .cu files only.
#pragma once

#include <cstdint>

namespace fastad {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// Every lane gets the sum of v over the warp. The butterfly adds in an order fixed by the lanes
// alone, so equal inputs always give equal sums.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Sum of squared differences of two rows read with their own strides and dtype, widened to
// float; every lane returns the total. The summation order depends only on d, so one pair always
// gets the same value: ties between duplicate rows stay exact ties.
template <typename scalar_t>
__device__ __forceinline__ float warp_sq_dist(const scalar_t* __restrict__ a, int64_t as,
                                              const scalar_t* __restrict__ b, int64_t bs, int64_t d,
                                              int lane) {
  float acc = 0.0f;
  for (int64_t c = lane; c < d; c += kWarp) {
    const float x = static_cast<float>(a[c * as]) - static_cast<float>(b[c * bs]);
    acc = fmaf(x, x, acc);
  }
  return warp_sum(acc);
}

}  // namespace fastad
