// CUDA k-center greedy: one fused kernel per step, no host synchronisation.
//
// Why this shape: on a GPU a full pass over x per step is cheap (x is read at full memory
// bandwidth across all SMs), while a host round trip per step (.item() of an argmax) would cost
// more than the pass. So step t is a single launch that
//   1. reads the row chosen at step t-1 from device memory (indices[t-1]),
//   2. lowers every unselected row's distance to the chosen set by its distance to that row
//      (one warp per row, a direct sum of squared differences in float32), and marks the chosen
//      row as selected (-1, below every distance),
//   3. reduces its rows to one (largest distance, lowest index) pair per block, and
//   4. has the last block to finish (an atomic ticket after a memory fence) reduce the blocks'
//      pairs and write indices[t] and radii[t] for the next launch.
// All k-1 launches go on the current stream under a device guard; the host never waits.
//
// Ties: (distance desc, index asc) everywhere, the same order as the CPU kernel. Distances are
// squared until the radius is written. A NaN distance counts as +inf, so non-finite rows are
// chosen (in index order) rather than lost, and the selected mark keeps indices distinct.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fastad/cuda_warp.cuh"
#include "kcenter.h"

namespace fastad {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kBlocksPerSm = 4;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kSelected = -1.0f;  // below every distance: a chosen row never wins again
constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();

// True when (va, ia) is the greedy's better choice: larger distance, ties to the lower index.
__device__ __forceinline__ bool better(float va, int64_t ia, float vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Reduces one (value, index) pair per thread to thread 0 of the block.
__device__ __forceinline__ void block_best(float& v, int64_t& i, float* sv, int64_t* si) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const float ov = __shfl_down_sync(kFullMask, v, off);
    const int64_t oi = __shfl_down_sync(kFullMask, i, off);
    if (better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarpsPerBlock; ++w)
      if (better(sv[w], si[w], v, i)) {
        v = sv[w];
        i = si[w];
      }
  }
  __syncthreads();  // sv/si may be reused by the caller
}

struct StepState {
  float* min_d;      // (n) squared distance to the chosen set; kSelected once chosen
  int64_t* indices;  // (k) output; [0, t) written
  float* radii;      // (k) output
  float* block_v;    // (gridDim.x) per-block best of this step
  int64_t* block_i;
  unsigned int* ticket;  // blocks finished in this step; reset to 0 by the last one
};

// Step t (1 <= t < k): fold in the row chosen at step t-1, then choose row t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    kcenter_step_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t d, int64_t t,
                        StepState s) {
  __shared__ float sv[kWarpsPerBlock];
  __shared__ int64_t si[kWarpsPerBlock];
  __shared__ bool last_block;
  const int lane = threadIdx.x % kWarp;
  const int64_t chosen = s.indices[t - 1];
  const scalar_t* crow = x + chosen * d;

  // Every lane of a warp holds the same running best (the same rows, the same values).
  float best_v = kSelected - 1.0f;
  int64_t best_i = kNoRow;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < n;
       r += warps) {
    // Lane 0 reads and lane 0 writes; the shuffle makes the branch below warp-uniform by
    // construction rather than by every lane happening to read the same value.
    float m = __shfl_sync(kFullMask, lane == 0 ? s.min_d[r] : 0.0f, 0);
    if (m != kSelected) {
      if (r == chosen) {
        m = kSelected;
      } else {
        float dist = warp_sq_dist(x + r * d, 1, crow, 1, d, lane);
        if (isnan(dist)) dist = kInf;
        m = fminf(m, dist);
      }
      if (lane == 0) s.min_d[r] = m;
    }
    if (better(m, r, best_v, best_i)) {
      best_v = m;
      best_i = r;
    }
  }
  block_best(best_v, best_i, sv, si);

  if (threadIdx.x == 0) {
    s.block_v[blockIdx.x] = best_v;
    s.block_i[blockIdx.x] = best_i;
    __threadfence();  // this block's pair is visible device-wide before its ticket is
    last_block = atomicAdd(s.ticket, 1u) == gridDim.x - 1;
    if (last_block) __threadfence();  // acquire side: the other blocks' pairs are read after this
  }
  __syncthreads();
  if (!last_block) return;

  // The last block: every other block's pair is written. __ldcg reads through L2, never a stale
  // L1 line from an earlier step on this SM.
  float v = kSelected - 1.0f;
  int64_t i = kNoRow;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += kThreads) {
    const float bv = __ldcg(s.block_v + b);
    const int64_t bi = __ldcg(s.block_i + b);
    if (better(bv, bi, v, i)) {
      v = bv;
      i = bi;
    }
  }
  block_best(v, i, sv, si);
  if (threadIdx.x == 0) {
    // t < k <= n, so at least one row is unselected and i is a real row with v >= 0.
    s.indices[t] = i;
    s.radii[t] = sqrtf(v);
    *s.ticket = 0u;  // ready for the next step (kernel boundaries order it)
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kcenter_greedy_cuda(const at::Tensor& x_in, int64_t k,
                                                       int64_t start) {
  check_kcenter_args(x_in, k, start);
  TORCH_CHECK(x_in.is_cuda(), "kcenter_greedy_cuda expects a CUDA tensor, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Row-major rows make each warp's reads coalesced; half inputs stay half (half the traffic).
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const auto opts = x.options();

  at::Tensor indices = at::full({k}, start, opts.dtype(at::kLong));
  at::Tensor radii = at::full({k}, kInf, opts.dtype(at::kFloat));
  if (k == 1) return {indices, radii};

  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(sms) * kBlocksPerSm,
                                             (n + kWarpsPerBlock - 1) / kWarpsPerBlock));
  at::Tensor min_d = at::full({n}, kInf, opts.dtype(at::kFloat));
  at::Tensor block_v = at::empty({blocks}, opts.dtype(at::kFloat));
  at::Tensor block_i = at::empty({blocks}, opts.dtype(at::kLong));
  at::Tensor ticket = at::zeros({1}, opts.dtype(at::kInt));
  const StepState state{min_d.mutable_data_ptr<float>(),
                        indices.mutable_data_ptr<int64_t>(),
                        radii.mutable_data_ptr<float>(),
                        block_v.mutable_data_ptr<float>(),
                        block_i.mutable_data_ptr<int64_t>(),
                        reinterpret_cast<unsigned int*>(ticket.mutable_data_ptr<int32_t>())};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Only the dtypes the op accepts: no double kernel that could never run.
  AT_DISPATCH_V2(x.scalar_type(), "kcenter_greedy_cuda", AT_WRAP([&] {
                   const scalar_t* xp = x.const_data_ptr<scalar_t>();
                   for (int64_t t = 1; t < k; ++t) {
                     kcenter_step_kernel<scalar_t>
                         <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xp, n, d, t,
                                                                                  state);
                     C10_CUDA_KERNEL_LAUNCH_CHECK();
                   }
                 }),
                 at::kFloat, at::kHalf, at::kBFloat16);
  return {indices, radii};
}

TORCH_LIBRARY_IMPL(fastad, CUDA, m) { m.impl("kcenter_greedy", &kcenter_greedy_cuda); }

}  // namespace fastad
