// Squared Euclidean distances shared by the CPU kernels (kNN's re-ranking, k-center's lazy
// greedy) where no vector set is available.
#pragma once

#include <cstdint>

namespace fastad {

// Sum of squared differences of two float rows of length d, in 8 partial sums that the tail
// continues, added in a fixed tree: the order depends only on d, so one pair always gets the same
// value (duplicate rows stay exact ties) and the compiler may vectorise the lanes.
inline float squared_distance_portable(const float* a, const float* b, int64_t d) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    for (int l = 0; l < 8; ++l) {
      const float x = a[j + l] - b[j + l];
      s[l] += x * x;
    }
  for (int l = 0; j < d; ++j, ++l) {
    const float x = a[j] - b[j];
    s[l] += x * x;
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

}  // namespace fastad
