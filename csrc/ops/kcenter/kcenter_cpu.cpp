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
// The state lives in a KCenterShard (kcenter_shard.h), which the op runs to completion on all the
// rows and fastad.distributed drives one step at a time on each process's rows.
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
#include <string>
#include <vector>

#include "kcenter.h"
#include "kcenter_cpu_distance.h"
#include "kcenter_shard.h"

namespace fastad {
namespace {

using kcenter_detail::DistanceKernels;
using kcenter_detail::Entry;
using kcenter_detail::Pending;

// Chosen rows a re-evaluation covers before it checks whether it may stop.
constexpr int64_t kChunk = 64;
// Stale rows taken off the heap at once: the first batch of a step, and the most (each further
// batch within one step doubles, up to this).
constexpr int64_t kFirstBatch = 8;
constexpr int64_t kMaxBatch = 64;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Heap order: larger bound first, equal bounds to the lower row.
inline bool ranks_before(const Entry& a, const Entry& b) {
  return a.bound > b.bound || (a.bound == b.bound && a.row < b.row);
}

// A binary max-heap under ranks_before, kept in a vector.
void sift_down(std::vector<Entry>& h, int64_t i) {
  const int64_t n = static_cast<int64_t>(h.size());
  const Entry e = h[i];
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && ranks_before(h[c + 1], h[c])) ++c;
    if (!ranks_before(h[c], e)) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = e;
}

void make_heap(std::vector<Entry>& h) {
  for (int64_t i = static_cast<int64_t>(h.size()) / 2 - 1; i >= 0; --i) sift_down(h, i);
}

void heap_push(std::vector<Entry>& h, const Entry& e) {
  int64_t i = static_cast<int64_t>(h.size());
  h.push_back(e);
  while (i > 0) {
    const int64_t parent = (i - 1) / 2;
    if (!ranks_before(e, h[parent])) break;
    h[i] = h[parent];
    i = parent;
  }
  h[i] = e;
}

void heap_pop(std::vector<Entry>& h) {
  h.front() = h.back();
  h.pop_back();
  if (!h.empty()) sift_down(h, 0);
}

// Lowers each pending row's bound by its distances to chosen rows seen .. t, a chunk at a time,
// and stops once the bound is below `enough` (the best bound left in the heap; negative: never).
// Rows are sorted by `seen` and evaluated four at a time from the group's earliest `seen`: a
// row's bound is already at most its distance to every row chosen before its own `seen`, so the
// chosen rows a later-starting member sees twice change nothing.
void refresh_bounds(const DistanceKernels& kernels, std::vector<Pending>& batch, const float* x,
                    const float* chosen, int64_t t, int64_t d, float enough) {
  std::sort(batch.begin(), batch.end(),
            [](const Pending& a, const Pending& b) { return a.seen < b.seen; });
  const int64_t m = static_cast<int64_t>(batch.size());
  int64_t g = 0;
  for (; g + 4 <= m; g += 4) {
    Pending* p = batch.data() + g;
    const float* points[4] = {x + p[0].entry.row * d, x + p[1].entry.row * d,
                              x + p[2].entry.row * d, x + p[3].entry.row * d};
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
// `first` names the first chosen row: "row 5", or "the first chosen row" when another shard has it.
[[noreturn]] void report_bad_values(const at::Tensor& x, const float* point, int64_t d,
                                    const std::string& first) {
  TORCH_CHECK_VALUE(at::isfinite(x).all().item<bool>(),
                    "x must hold only finite values, got NaN or Inf");
  for (int64_t j = 0; j < d; ++j)
    TORCH_CHECK_VALUE(std::isfinite(point[j]),
                      "the first chosen row must hold only finite values, got NaN or Inf");
  TORCH_CHECK_VALUE(
      false, "squared distances between rows of x overflow float32 (some row is too far from ",
      first, "); scale x down");
}

}  // namespace

namespace {
const at::Tensor& checked_shard(const at::Tensor& x, int64_t capacity) {
  check_dims(x, "x", 2, "(n, D)");
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "KCenterShard runs on the CPU, got x on ", x.device());
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must have at least one feature column, got D = 0");
  TORCH_CHECK_VALUE(capacity >= 1, "capacity must be at least 1, got ", capacity);
  return x;
}
}  // namespace

KCenterShard::KCenterShard(const at::Tensor& x, int64_t capacity)
    : x_(checked_shard(x, capacity).to(at::kFloat).contiguous()),  // no copy for contiguous float32
      xp_(x_.const_data_ptr<float>()),
      n_(x_.size(0)),
      d_(x_.size(1)),
      capacity_(capacity),
      kernels_(kcenter_detail::distance_kernels()),
      want_(kFirstBatch) {
  chosen_.resize(static_cast<size_t>(capacity_ * d_));
  batch_.reserve(kMaxBatch);
}

const float* KCenterShard::point_of(const at::Tensor& point) const {
  TORCH_CHECK_VALUE(point.dim() == 1 && point.size(0) == d_ && point.scalar_type() == at::kFloat &&
                        point.device().is_cpu() && point.is_contiguous(),
                    "point must be a contiguous float32 CPU tensor of shape (", d_, "), got ",
                    point.scalar_type(), " of shape ", point.sizes(), " on ", point.device());
  return point.const_data_ptr<float>();
}

void KCenterShard::push_chosen(const float* point) {
  TORCH_CHECK_VALUE(t_ < capacity_, "this shard has chosen its capacity of ", capacity_,
                    " rows already");
  std::memcpy(chosen_.data() + t_ * d_, point, sizeof(float) * d_);
  ++t_;
  want_ = kFirstBatch;
}

// First pass: every row against the first chosen row. A NaN or Inf anywhere in x makes some
// distance non-finite (one in row p reaches d(p, first); one in the first row reaches every
// distance), so checking the distances checks the input. Keeping them below a quarter of
// float32's range also keeps every later one finite: d(p, c)^2 <= 2 d(p, first)^2 + 2 d(c,
// first)^2.
void KCenterShard::evaluate_all(const float* point, int64_t skip, int64_t first_row) {
  std::vector<Entry> entries(static_cast<size_t>(n_ - (skip >= 0 ? 1 : 0)));
  constexpr float kLargest = std::numeric_limits<float>::max() / 4.5f;
  std::atomic<bool> bad{false};
  at::parallel_for(0, n_, 4096, [&](int64_t begin, int64_t end) {
    bool local_bad = false;
    for (int64_t p = begin; p < end; ++p) {
      if (p == skip) continue;
      const float v = kernels_.min1(xp_ + p * d_, point, 1, d_, kInf);
      local_bad |= !(v <= kLargest);
      entries[skip >= 0 && p > skip ? p - 1 : p] = Entry{v, p};
    }
    if (local_bad) bad = true;
  });
  // A lone row has no distance to reveal a NaN or Inf in it: look at its values.
  if (n_ == 1 && skip == 0) {
    for (int64_t j = 0; j < d_; ++j) bad = bad || !std::isfinite(xp_[j]);
  }
  if (bad)
    report_bad_values(x_, point, d_,
                      first_row >= 0 ? "row " + std::to_string(first_row) : "the first chosen row");
  heap_ = std::move(entries);
  make_heap(heap_);
  seen_.assign(static_cast<size_t>(n_), 1);  // every row has been evaluated against the first
}

void KCenterShard::begin(const at::Tensor& point, int64_t local) {
  TORCH_CHECK_VALUE(!begun_, "begin() was called already");
  TORCH_CHECK_VALUE(local >= -1 && local < n_, "local must be a row of this shard (0 to ", n_ - 1,
                    ") or -1, got ", local);
  const float* p = point_of(point);
  if (local >= 0) {
    TORCH_CHECK_VALUE(std::memcmp(p, xp_ + local * d_, sizeof(float) * d_) == 0,
                      "point must hold the values of row ", local);
  }
  begun_ = true;
  push_chosen(p);
  evaluate_all(chosen_.data(), local, -1);
}

void KCenterShard::begin_local(int64_t local) {
  begun_ = true;
  push_chosen(xp_ + local * d_);
  evaluate_all(chosen_.data(), local, local);
}

std::tuple<float, int64_t> KCenterShard::propose_fast() {
  std::vector<Pending>& batch = batch_;
  while (!heap_.empty()) {
    const Entry top = heap_.front();
    if (seen_[top.row] == t_) return {top.bound, top.row};  // exact: the greedy's choice here
    batch.clear();
    while (!heap_.empty() && static_cast<int64_t>(batch.size()) < want_ &&
           seen_[heap_.front().row] != t_) {
      batch.push_back(Pending{heap_.front(), seen_[heap_.front().row]});
      heap_pop(heap_);
    }
    refresh_bounds(kernels_, batch, xp_, chosen_.data(), t_, d_,
                   heap_.empty() ? -1.0f : heap_.front().bound);
    for (const Pending& e : batch) {
      seen_[e.entry.row] = e.seen;
      heap_push(heap_, e.entry);
    }
    want_ = std::min(kMaxBatch, 2 * want_);
  }
  return {-1.0f, -1};
}

std::tuple<double, int64_t> KCenterShard::propose() {
  TORCH_CHECK_VALUE(begun_, "begin() must choose the first row before propose()");
  const auto [bound, row] = propose_fast();
  return {static_cast<double>(bound), row};
}

float KCenterShard::add_local(int64_t local) {
  const Entry top = heap_.front();
  heap_pop(heap_);
  push_chosen(xp_ + local * d_);
  return top.bound;
}

void KCenterShard::add(const at::Tensor& point, int64_t local) {
  TORCH_CHECK_VALUE(begun_, "begin() must choose the first row before add()");
  const float* p = point_of(point);
  if (local >= 0) {
    TORCH_CHECK_VALUE(!heap_.empty() && heap_.front().row == local && seen_[local] == t_,
                      "local row ", local, " is not this shard's proposal; call propose() first");
    TORCH_CHECK_VALUE(std::memcmp(p, xp_ + local * d_, sizeof(float) * d_) == 0,
                      "point must hold the values of row ", local);
    heap_pop(heap_);
  } else {
    TORCH_CHECK_VALUE(local == -1, "local must be a row of this shard or -1, got ", local);
  }
  push_chosen(p);
}

std::tuple<at::Tensor, at::Tensor> kcenter_greedy_cpu(const at::Tensor& x_in, int64_t k,
                                                      int64_t start) {
  check_kcenter_args(x_in, k, start);
  at::Tensor indices = at::empty({k}, x_in.options().dtype(at::kLong));
  at::Tensor radii = at::empty({k}, x_in.options().dtype(at::kFloat));
  int64_t* sel = indices.mutable_data_ptr<int64_t>();
  float* rad = radii.mutable_data_ptr<float>();
  KCenterShard shard(x_in, k);
  shard.begin_local(start);
  sel[0] = start;
  rad[0] = kInf;
  for (int64_t t = 1; t < k; ++t) {
    const auto [bound, row] = shard.propose_fast();
    sel[t] = row;
    rad[t] = std::sqrt(bound);
    shard.add_local(row);
  }
  return {indices, radii};
}

TORCH_LIBRARY_IMPL(fastad, CPU, m) { m.impl("kcenter_greedy", &kcenter_greedy_cpu); }

}  // namespace fastad
