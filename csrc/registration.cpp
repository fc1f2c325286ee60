// The one place where fastad's operators are declared: this file reads as the op API.
// Each op's shapes and dtypes are in csrc/ops/<op>/<op>.h, its meaning in
// python/fastad/reference.py.
#include <torch/library.h>

#include "ops/kcenter/kcenter_shard.h"

TORCH_LIBRARY(fastad, m) {
  // Exact k nearest bank rows of every query row: (distances (M,k) float32 ascending, indices (M,k)
  // int64). `prepared` (from knn_prepare) spares a bank searched many times its per-call coding;
  // same results.
  m.def(
      "knn(Tensor query, Tensor bank, int k, bool squared=False, Tensor? prepared=None) -> "
      "(Tensor, Tensor)");
  // Per-bank work of knn done once: a uint8 tensor on the bank's device (empty where nothing
  // applies).
  m.def("knn_prepare(Tensor bank) -> Tensor");
  // Greedy k-center coreset of x's rows from row `start`: (indices (k,) int64 in order, radii (k,)
  // float32).
  m.def("kcenter_greedy(Tensor x, int k, int start=0) -> (Tensor, Tensor)");
  // The same selection one step at a time over one shard of the rows (CPU), for fastad.distributed:
  // KCenterShard(x, capacity); begin(point, local); propose() -> (bound, local); add(point, local).
  m.class_<fastad::KCenterShard>("KCenterShard")
      .def(torch::init<at::Tensor, int64_t>())
      .def("begin", &fastad::KCenterShard::begin)
      .def("propose", &fastad::KCenterShard::propose)
      .def("add", &fastad::KCenterShard::add)
      .def("chosen", &fastad::KCenterShard::chosen);
  // Squared Mahalanobis distance of x (B,P,D) to mean (P|1,D) under precision L L^T, L (P|1,D,D)
  // lower: (B,P) float32.
  m.def("mahalanobis(Tensor x, Tensor mean, Tensor L) -> Tensor");
  // Orthogonal Matching Pursuit of x (G,M,d) over unit atoms (G,K,d), s = n_nonzero: (indices
  // (G,M,s) int64, coefs (G,M,s) float32).
  m.def("omp(Tensor x, Tensor dictionary, int n_nonzero) -> (Tensor, Tensor)");
}
