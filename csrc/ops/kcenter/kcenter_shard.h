// fastad::KCenterShard — the CPU greedy k-center, one step at a time, over one shard of the rows.
//
// The op kcenter_greedy (kcenter.h) runs its whole selection in one call. A selection over rows
// split among processes (fastad.distributed.kcenter_greedy) needs the same rule one step at a
// time: each process proposes its farthest row, one collective picks the winner, and every process
// adds the winner's row to its chosen set. This class is that step; the op is the same class run
// to completion on all the rows, so one process and many follow one code path.
//
//   KCenterShard(x, capacity)       x (n, D) float32 | float16 | bfloat16 on the CPU, n >= 1;
//                                   capacity: the most rows that will be chosen (k), >= 1
//   begin(point, local)             the first chosen row: point (D,) float32, its values; local:
//                                   its row in this shard, or -1 where another shard holds it.
//                                   Evaluates every row against it (and rejects non-finite input)
//   propose() -> (bound, local)     this shard's candidate: its unchosen row farthest from the
//                                   chosen set, as (squared distance, row), equal distances to the
//                                   lowest row; (-1.0, -1) when every row of the shard is chosen
//   add(point, local)               the next chosen row: its values, and its row here or -1.
//                                   A local row must be the one propose() returned
//   chosen() -> int                 rows chosen so far
//
// Across shards, the global rule (largest distance, ties to the lowest global row) is the
// proposals' maximum by (bound desc, global row asc) when the shards hold consecutive row ranges
// in order. Each distance is a direct float32 sum whose bits depend only on the two rows, D and
// the instruction set (kcenter_cpu_distance.h), so shards on CPUs with the same distance kernels
// choose exactly the rows that one process would; FASTAD_KCENTER_CPU_ISA can force the same set
// everywhere. The lazy bounds (kcenter_cpu.cpp) stay per shard: a step evaluates only the rows
// whose bounds could make them the shard's farthest.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "kcenter_cpu_distance.h"

namespace fastad {

namespace kcenter_detail {
struct Entry {
  float bound;  // upper bound of the squared distance to the chosen set
  int64_t row;
};
// A row taken off the heap for re-evaluation.
struct Pending {
  Entry entry;
  int64_t seen;
};
}  // namespace kcenter_detail

class KCenterShard : public torch::CustomClassHolder {
 public:
  KCenterShard(const at::Tensor& x, int64_t capacity);

  void begin(const at::Tensor& point, int64_t local);
  std::tuple<double, int64_t> propose();
  void add(const at::Tensor& point, int64_t local);
  int64_t chosen() const { return t_; }

  // The op's fast path: the shard's own row `local` as the first / next chosen row.
  void begin_local(int64_t local);
  float add_local(int64_t local);  // returns its squared distance to the set before it
  std::tuple<float, int64_t> propose_fast();

 private:
  void evaluate_all(const float* point, int64_t skip, int64_t first_row);
  void push_chosen(const float* point);
  const float* point_of(const at::Tensor& point) const;

  at::Tensor x_;  // contiguous float32
  const float* xp_;
  int64_t n_, d_, capacity_;
  kcenter_detail::DistanceKernels kernels_;
  std::vector<float> chosen_;  // (capacity, D): the chosen rows, contiguous
  int64_t t_ = 0;              // rows chosen so far
  std::vector<kcenter_detail::Entry> heap_;
  std::vector<int64_t> seen_;
  std::vector<kcenter_detail::Pending> batch_;  // reused by every step: no allocation per step
  int64_t want_;
  bool begun_ = false;
};

}  // namespace fastad
