// Bounded selection of the k best (distance, index) pairs, shared by the CPU kernels.
//
// Order: smaller distance first, ties to the smaller index, NaN treated as +inf. The heap starts
// full of (+inf, INT64_MAX) sentinels, so any real candidate (even +inf) beats a sentinel and the
// k returned indices are always real ones when at least k candidates were offered.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace fastad {

// True when (da, ia) ranks after (db, ib).
inline bool ranks_after(float da, int64_t ia, float db, int64_t ib) {
  return da > db || (da == db && ia > ib);
}

// A max-heap over caller-owned storage (d[k], i[k]); the root is the current k-th best.
struct TopKHeap {
  float* d;
  int64_t* i;
  int64_t k;

  void reset() {
    for (int64_t j = 0; j < k; ++j) {
      d[j] = std::numeric_limits<float>::infinity();
      i[j] = std::numeric_limits<int64_t>::max();
    }
  }

  // The distance a candidate must not exceed to have a chance of entering.
  float threshold() const { return d[0]; }

  void push(float dist, int64_t idx) {
    if (std::isnan(dist)) dist = std::numeric_limits<float>::infinity();
    if (!ranks_after(d[0], i[0], dist, idx)) return;
    sift_down_from_root(dist, idx, k);
  }

  // Sorts the storage ascending in place (destroys the heap property).
  void sort_ascending() {
    for (int64_t n = k - 1; n > 0; --n) {
      const float dl = d[n];
      const int64_t il = i[n];
      d[n] = d[0];
      i[n] = i[0];
      sift_down_from_root(dl, il, n);
    }
  }

 private:
  void sift_down_from_root(float dist, int64_t idx, int64_t n) {
    int64_t pos = 0;
    while (true) {
      int64_t child = 2 * pos + 1;
      if (child >= n) break;
      if (child + 1 < n && ranks_after(d[child + 1], i[child + 1], d[child], i[child])) ++child;
      if (!ranks_after(d[child], i[child], dist, idx)) break;
      d[pos] = d[child];
      i[pos] = i[child];
      pos = child;
    }
    d[pos] = dist;
    i[pos] = idx;
  }
};

}  // namespace fastad
