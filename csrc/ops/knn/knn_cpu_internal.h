// Pieces shared by the two CPU kNN paths (not part of the op's contract; see knn.h for that).
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "fastad/topk.h"

namespace fastad {
namespace knn_detail {

// Sum of squared differences of two float rows, computed directly (no norm cancellation).
float squared_distance(const float* a, const float* b, int64_t d);

std::vector<float> squared_row_norms(const float* x, int64_t rows, int64_t d);

// Both CPU paths are screens: a cheap lower bound on each squared distance decides which bank
// rows may still enter a query's k best, and only those are re-ranked with squared_distance.
// This keeps the results exact (including ties between duplicate rows, which a norm-expanded
// distance can break either way) whatever the screen's precision.
//
// Per-row state for rows [row0, row0 + rows): the exact k best so far (in caller storage) and a
// buffer of rows waiting for re-ranking. Rows are independent, so different threads may work on
// different rows of one object.
class CandidateRows {
 public:
  static constexpr int64_t kCapacity = 256;

  CandidateRows(const float* q, const float* b, int64_t d, int64_t k, int64_t row0, int64_t rows,
                float* dist, int64_t* idx)
      : q_(q), b_(b), d_(d), k_(k), row0_(row0), dist_(dist), idx_(idx),
        cand_(static_cast<size_t>(rows * kCapacity)), count_(rows, 0),
        thr_(rows, std::numeric_limits<float>::infinity()),
        inflate_(1.0f + static_cast<float>(d + 8) * 1.2e-7f) {
    for (int64_t r = 0; r < rows; ++r) heap(r).reset();
  }

  // A bank row whose lower bound exceeds this cannot enter row r's result. The k-th distance
  // is inflated by the rounding of a direct float32 sum of d squares, so a row whose exact
  // distance ties the k-th within that rounding is still re-ranked.
  float threshold(int64_t r) const { return thr_[r] * inflate_; }

  void add(int64_t r, int64_t j) {
    cand_[r * kCapacity + count_[r]++] = j;
    if (count_[r] == kCapacity) rerank(r);
  }

  void rerank(int64_t r) {
    TopKHeap h = heap(r);
    const float* qrow = q_ + (row0_ + r) * d_;
    const int64_t* c = cand_.data() + r * kCapacity;
    for (int64_t i = 0; i < count_[r]; ++i) h.push(squared_distance(qrow, b_ + c[i] * d_, d_), c[i]);
    count_[r] = 0;
    thr_[r] = h.threshold();
  }

  void rerank_all() {
    for (int64_t r = 0; r < static_cast<int64_t>(count_.size()); ++r)
      if (count_[r]) rerank(r);
  }

 private:
  TopKHeap heap(int64_t r) const { return TopKHeap{dist_ + r * k_, idx_ + r * k_, k_}; }

  const float* q_;
  const float* b_;
  int64_t d_, k_, row0_;
  float* dist_;
  int64_t* idx_;
  std::vector<int64_t> cand_;
  std::vector<int64_t> count_;
  std::vector<float> thr_;
  float inflate_;
};

// Float32 path: a norm-expanded GEMM screen whose bound is float32 rounding alone. Fills dist/idx
// (row-major (m, k)) with exact squared distances, unsorted.
void knn_gemm_tiles(const float* q, int64_t m, const float* b, int64_t n, int64_t d, int64_t k,
                    float* dist, int64_t* idx);

// Screened path: an int8 first pass with a per-pair error bound, exact re-ranking of every
// candidate the bound cannot rule out. Fills dist/idx with exact squared distances (unsorted) and
// returns true, or returns false without touching them when the inputs do not suit it (no AVX2,
// small problems, non-finite values). Uses the AVX-512 VNNI micro-kernel where the CPU has it and
// allow_vnni is set, the AVX2 one otherwise.
bool knn_screened_int8(const float* q, int64_t m, const float* b, int64_t n, int64_t d, int64_t k,
                       bool allow_vnni, float* dist, int64_t* idx);

// Sorts each row ascending (ties by index), clamps at 0 and takes square roots unless `squared`.
void finish_rows(int64_t m, int64_t k, bool squared, float* dist, int64_t* idx);

}  // namespace knn_detail
}  // namespace fastad
