// CPU k-center greedy: the exact farthest-point rule, evaluated lazily.
//
// The plain greedy streams all N rows through memory once per step: N x k distances and k
// memory passes. Here every unselected row p keeps an upper bound u(p) of its squared distance
// to the chosen set, and `seen(p)`, the number of chosen rows (a prefix of the selection order)
// that u(p) accounts for: u(p) = min over the first seen(p) chosen rows of d^2(p, c). Distances
// to the set only shrink as rows are chosen, so u(p) stays an upper bound. A max-heap orders the
// rows by (u desc, index asc). Each step looks at the heap's top:
//  * if it accounts for every chosen row, u is its exact distance, and every other row's exact
//    distance is at most its own bound, which the heap order puts at or below the top's (an
//    equal bound only at a higher index), so the top is exactly the row the greedy rule picks,
//    tie rule included;
//  * otherwise the top few stale rows are taken off the heap, evaluated against the rows chosen
//    since their `seen`, and put back with their tighter bounds.
// Each (row, chosen row) pair is computed at most once, so the work never exceeds the plain
// greedy's; rows deep inside covered regions are never looked at again.
//
// Evaluation is a row against a run of chosen rows that sit contiguously in a (k, D) buffer, four
// rows at a time (kcenter_cpu_distance.cpp), so it is compute-bound rather than memory-bound. It
// stops early, in chunks, once a row's bound falls below the best bound left in the heap: the row
// cannot be chosen before it surfaces again, and by then more rows may have been chosen, or the
// rest of its run may never be needed at all.
//
// The selection loop runs on one thread. Splitting each batch's evaluations over threads with
// at::parallel_for was measured on the 2-core development machine: the batches are tens of
// microseconds of work, so when the machine was otherwise idle two threads were only about 1.3x
// faster, and while other processes were running every fork-join waited for a descheduled thread
// and the op became 3x to 50x slower. The first pass over all rows is parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kcenter.h"
#include "kcenter_cpu_distance.h"

namespace fastad {
namespace {

using kcenter_detail::DistanceKernels;

// Chosen rows a re-evaluation covers before it checks whether it may stop.
constexpr int64_t kChunk = 64;
// Stale rows taken off the heap at once: the first batch of a step, and the most (each further
// batch within one step doubles, up to this).
constexpr int64_t kFirstBatch = 8;
constexpr int64_t kMaxBatch = 64;

struct Entry {
  float bound;  // upper bound of the squared distance to the chosen set
  int64_t row;
};

// Heap order: larger bound first, equal bounds to the lower row.
inline bool ranks_before(const Entry& a, const Entry& b) {
  return a.bound > b.bound || (a.bound == b.bound && a.row < b.row);
}

// A binary max-heap under ranks_before.
class BoundHeap {
 public:
  explicit BoundHeap(std::vector<Entry> entries) : h_(std::move(entries)) {
    for (int64_t i = static_cast<int64_t>(h_.size()) / 2 - 1; i >= 0; --i) sift_down(i);
  }
  bool empty() const { return h_.empty(); }
  const Entry& top() const { return h_.front(); }
  void push(const Entry& e) {
    int64_t i = static_cast<int64_t>(h_.size());
    h_.push_back(e);
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (!ranks_before(e, h_[parent])) break;
      h_[i] = h_[parent];
      i = parent;
    }
    h_[i] = e;
  }
  void pop() {
    h_.front() = h_.back();
    h_.pop_back();
    if (!h_.empty()) sift_down(0);
  }

 private:
  void sift_down(int64_t i) {
    const int64_t n = static_cast<int64_t>(h_.size());
    const Entry e = h_[i];
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && ranks_before(h_[c + 1], h_[c])) ++c;
      if (!ranks_before(h_[c], e)) break;
      h_[i] = h_[c];
      i = c;
    }
    h_[i] = e;
  }
  std::vector<Entry> h_;
};

// A row taken off the heap for re-evaluation.
struct Pending {
  Entry entry;
  int64_t seen;
};

// Lowers each pending row's bound by its distances to chosen rows seen .. t, a chunk at a time,
// and stops once the bound is below `enough` (the best bound left in the heap; negative: never).
// Rows are sorted by `seen` and evaluated four at a time from the group's earliest `seen`: a
// row's bound is already at most its distance to every row chosen before its own `seen`, so the
// chosen rows a later-starting member sees twice change nothing.
void refresh_bounds(const DistanceKernels& kernels, std::vector<Pending>& batch, const float* x,
                    const float* chosen, int64_t t, int64_t d, float enough) {
  std::sort(batch.begin(), batch.end(), [](const Pending& a, const Pending& b) { return a.seen < b.seen; });
  const int64_t m = static_cast<int64_t>(batch.size());
  int64_t g = 0;
  for (; g + 4 <= m; g += 4) {
    Pending* p = batch.data() + g;
    const float* points[4] = {x + p[0].entry.row * d, x + p[1].entry.row * d, x + p[2].entry.row * d,
                              x + p[3].entry.row * d};
    float bounds[4] = {p[0].entry.bound, p[1].entry.bound, p[2].entry.bound, p[3].entry.bound};
    int64_t pos = p[0].seen;
    while (pos < t) {
      const int64_t count = std::min(kChunk, t - pos);
      kernels.min4(points, chosen + pos * d, count, d, bounds);
      pos += count;
      if (std::max(std::max(bounds[0], bounds[1]), std::max(bounds[2], bounds[3])) < enough) break;
    }
    for (int q = 0; q < 4; ++q) {
      p[q].entry.bound = bounds[q];
      p[q].seen = std::max(p[q].seen, pos);
    }
  }
  for (; g < m; ++g) {
    Pending& r = batch[g];
    const float* point = x + r.entry.row * d;
    while (r.seen < t) {
      const int64_t count = std::min(kChunk, t - r.seen);
      r.entry.bound = kernels.min1(point, chosen + r.seen * d, count, d, r.entry.bound);
      r.seen += count;
      if (r.entry.bound < enough) break;
    }
  }
}

// Rejects non-finite rows with a message that says which problem it is. Called only when the
// first pass found a non-finite or huge distance, so finite inputs never pay for the scan.
[[noreturn]] void report_bad_values(const at::Tensor& x, int64_t start) {
  TORCH_CHECK_VALUE(at::isfinite(x).all().item<bool>(), "x must hold only finite values, got NaN or Inf");
  TORCH_CHECK_VALUE(false, "squared distances between rows of x overflow float32 (some row is too far from row ",
              start, "); scale x down");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kcenter_greedy_cpu(const at::Tensor& x_in, int64_t k,
                                                      int64_t start) {
  check_kcenter_args(x_in, k, start);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();  // no copy for contiguous float32
  const int64_t n = x.size(0), d = x.size(1);
  const float* xp = x.const_data_ptr<float>();
  const DistanceKernels kernels = kcenter_detail::distance_kernels();
  constexpr float kInf = std::numeric_limits<float>::infinity();

  at::Tensor indices = at::empty({k}, x_in.options().dtype(at::kLong));
  at::Tensor radii = at::empty({k}, x_in.options().dtype(at::kFloat));
  int64_t* sel = indices.mutable_data_ptr<int64_t>();
  float* rad = radii.mutable_data_ptr<float>();
  sel[0] = start;
  rad[0] = kInf;

  // The chosen rows, contiguous, so that re-evaluations stream them from cache.
  std::vector<float> chosen(static_cast<size_t>(k * d));
  std::memcpy(chosen.data(), xp + start * d, sizeof(float) * d);

  // First pass: every row against the start row. A NaN or Inf anywhere in x makes some distance
  // non-finite (one in row p reaches d(p, start); one in the start row reaches every distance),
  // so checking the distances checks the input. Keeping them below a quarter of float32's range
  // also keeps every later one finite: d(p, c)^2 <= 2 d(p, start)^2 + 2 d(c, start)^2.
  std::vector<Entry> entries(static_cast<size_t>(n - 1));
  constexpr float kLargest = std::numeric_limits<float>::max() / 4.5f;
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    bool local_bad = false;
    for (int64_t p = begin; p < end; ++p) {
      if (p == start) continue;
      const float v = kernels.min1(xp + p * d, chosen.data(), 1, d, kInf);
      local_bad |= !(v <= kLargest);
      entries[p < start ? p : p - 1] = Entry{v, p};
    }
    if (local_bad) bad = true;
  });
  // A lone row has no distance to reveal a NaN or Inf in it: look at its values.
  if (n == 1) {
    for (int64_t j = 0; j < d; ++j) bad = bad || !std::isfinite(xp[j]);
  }
  if (bad) report_bad_values(x, start);
  if (k == 1) return {indices, radii};

  BoundHeap heap(std::move(entries));
  std::vector<int64_t> seen(n, 1);  // every row has been evaluated against the start row
  std::vector<Pending> batch;
  batch.reserve(kMaxBatch);
  int64_t want = kFirstBatch;
  for (int64_t t = 1; t < k;) {  // t rows chosen so far
    const Entry top = heap.top();
    if (seen[top.row] == t) {  // exact: the greedy's choice
      sel[t] = top.row;
      rad[t] = std::sqrt(top.bound);
      std::memcpy(chosen.data() + t * d, xp + top.row * d, sizeof(float) * d);
      heap.pop();
      ++t;
      want = kFirstBatch;
      continue;
    }
    batch.clear();
    while (!heap.empty() && static_cast<int64_t>(batch.size()) < want && seen[heap.top().row] != t) {
      batch.push_back(Pending{heap.top(), seen[heap.top().row]});
      heap.pop();
    }
    refresh_bounds(kernels, batch, xp, chosen.data(), t, d, heap.empty() ? -1.0f : heap.top().bound);
    for (const Pending& e : batch) {
      seen[e.entry.row] = e.seen;
      heap.push(e.entry);
    }
    want = std::min(kMaxBatch, 2 * want);
  }
  return {indices, radii};
}

TORCH_LIBRARY_IMPL(fastad, CPU, m) { m.impl("kcenter_greedy", &kcenter_greedy_cpu); }

}  // namespace fastad
