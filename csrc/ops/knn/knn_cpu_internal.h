// Pieces shared by the CPU kNN files (not part of the op's contract; see knn.h for that):
//   knn_cpu.cpp           validation, path choice, the float32 GEMM path, finishing
//   knn_cpu_codes.cpp     int8 coding of bank and query rows; the prepared bank's byte layout
//   knn_cpu_screened.cpp  the int8 screen: AVX2, AVX-512 VNNI and AMX micro-kernels, tasks
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
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
// Per-row state for rows [row0, row0 + rows): the exact k best so far (in caller storage), a
// buffer of rows waiting for re-ranking, and the k smallest upper bounds offered so far. Rows are
// independent, so different threads may work on different rows of one object.
//
// The threshold is the smaller of the k-th exact distance and the k-th smallest upper bound: the
// k nearest rows are no farther than any k rows' upper bounds, so a screen that also bounds from
// above rules rows out from its first tile on, before anything has been re-ranked.
class CandidateRows {
 public:
  static constexpr int64_t kCapacity = 256;

  CandidateRows(const float* q, const float* b, int64_t d, int64_t k, int64_t row0, int64_t rows,
                float* dist, int64_t* idx)
      : q_(q),
        b_(b),
        d_(d),
        k_(k),
        row0_(row0),
        dist_(dist),
        idx_(idx),
        cand_(static_cast<size_t>(rows * kCapacity)),
        count_(rows, 0),
        thr_(rows, std::numeric_limits<float>::infinity()),
        upper_(static_cast<size_t>(rows * k), std::numeric_limits<float>::infinity()),
        inflate_(1.0f + static_cast<float>(d + 8) * 1.2e-7f) {
    for (int64_t r = 0; r < rows; ++r) heap(r).reset();
  }

  // A bank row whose lower bound exceeds this cannot enter row r's result. The k-th distance
  // is inflated by the rounding of a direct float32 sum of d squares, so a row whose exact
  // distance ties the k-th within that rounding is still re-ranked.
  float threshold(int64_t r) const { return thr_[r] * inflate_; }

  // An upper bound must be below this to tighten row r's threshold.
  float upper_threshold(int64_t r) const { return upper_[r * k_]; }

  // Records an upper bound on the distance from row r to a bank row not offered before.
  void offer_upper(int64_t r, float ub) {
    float* h = upper_.data() + r * k_;
    if (!(ub < h[0])) return;
    // Replace the root of the max-heap of the k smallest bounds and sift it down.
    int64_t pos = 0;
    while (true) {
      int64_t child = 2 * pos + 1;
      if (child >= k_) break;
      if (child + 1 < k_ && h[child + 1] > h[child]) ++child;
      if (!(h[child] > ub)) break;
      h[pos] = h[child];
      pos = child;
    }
    h[pos] = ub;
    thr_[r] = std::min(thr_[r], h[0]);
  }

  void add(int64_t r, int64_t j) {
    cand_[r * kCapacity + count_[r]++] = j;
    if (count_[r] == kCapacity) rerank(r);
  }

  void rerank(int64_t r) {
    TopKHeap h = heap(r);
    const float* qrow = q_ + (row0_ + r) * d_;
    const int64_t* c = cand_.data() + r * kCapacity;
    for (int64_t i = 0; i < count_[r]; ++i)
      h.push(squared_distance(qrow, b_ + c[i] * d_, d_), c[i]);
    count_[r] = 0;
    thr_[r] = std::min(h.threshold(), upper_[r * k_]);
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
  std::vector<float> upper_;  // (rows, k) max-heaps
  float inflate_;
};

// Float32 path: a norm-expanded GEMM screen whose bound is float32 rounding alone. Fills dist/idx
// (row-major (m, k)) with exact squared distances, unsorted.
void knn_gemm_tiles(const float* q, int64_t m, const float* b, int64_t n, int64_t d, int64_t k,
                    float* dist, int64_t* idx);

// Sorts each row ascending (ties by index), clamps at 0 and takes square roots unless `squared`.
void finish_rows(int64_t m, int64_t k, bool squared, float* dist, int64_t* idx);

// ---- the int8 screen ----------------------------------------------------------------------------
//
// Codes, packing and the bound are described in knn_cpu_codes.cpp. One packing serves every
// micro-kernel: bank codes in panels of kPanel columns, kGroup dims of a column together, and the
// dims padded to kDimChunk (one AMX tile row of bytes).
constexpr int kCodeMax = 63;
constexpr int kQueryOffset = 64;
constexpr int kGroup = 4;                 // dims per int32 lane of a dot-product instruction
constexpr int kPanel = 16;                // bank columns per packed panel: one zmm of int32 sums
constexpr int64_t kDimChunk = 64;         // dims are padded to a multiple of this
constexpr int64_t kColumnPad = 32;        // bank columns are padded to a multiple of this
constexpr int64_t kQueryRowPad = 32;      // query rows are padded to a multiple of this
constexpr int64_t kMaxScreenDim = 65536;  // int32 sums of 127 * 63 products stay exact below this
// Relative slack on |q|^2 + |b|^2 for float32 rounding: the lower bound takes it off, the upper
// bound adds it (kUpperSlack on the already reduced A + P: (1 - s)(1 + 2s) > 1 + s / 2).
constexpr float kSlack = 1e-5f;
constexpr float kUpperSlack = 2 * kSlack;

// A coded bank, as views into the bytes knn_prepare returns (or a temporary made by the call).
struct BankCodes {
  int64_t n = 0, d = 0;
  int64_t dp = 0;                  // d rounded up to kDimChunk
  int64_t np = 0;                  // n rounded up to kColumnPad
  const double* center = nullptr;  // (d) the bank's column means; rows are coded centred
  // Per column (np; the padding columns have P = NaN, so they never pass the screen):
  const float *P = nullptr, *S = nullptr, *T = nullptr, *U = nullptr, *V = nullptr;
  const int8_t* packed = nullptr;  // (np / kPanel) panels of (dp / kGroup, kPanel, kGroup) codes
  int64_t panel_bytes() const { return dp * kPanel; }
};

// Codes the bank (n, d) float32 rows into a new uint8 tensor, or returns an empty one when a
// value is not finite (the screen cannot bound it).
at::Tensor code_bank(const float* b, int64_t n, int64_t d);

// Reads the bytes made by code_bank for the bank b (n, d); raises when they are not a coding of
// this bank (shape, layout version or a fingerprint of sampled rows differ).
BankCodes view_bank_codes(const at::Tensor& codes, const float* b, int64_t n, int64_t d);

// Query rows coded against a bank's centre, with the per-row terms of the bound.
struct QueryCodes {
  int64_t m = 0, m_pad = 0;    // m_pad: m rounded up to kQueryRowPad
  std::vector<uint8_t> codes;  // (m_pad, dp) code + kQueryOffset; zero padding rows and dims
  std::vector<float> A, W, X, Y, Z;
};

// Returns false when a value is not finite.
bool code_queries(const float* q, int64_t m, const BankCodes& bank, QueryCodes& out);

enum class ScreenKernel { kAvx2, kVnni, kAmx };

// The screened path: the int8 first pass with a per-pair error bound, exact re-ranking of every
// candidate the bound cannot rule out. Fills dist/idx with exact squared distances (unsorted) and
// returns true, or returns false without touching them when a query value is not finite.
bool knn_screened_int8(const float* q, int64_t m, const float* b, const BankCodes& bank, int64_t k,
                       ScreenKernel kernel, float* dist, int64_t* idx);

}  // namespace knn_detail
}  // namespace fastad
