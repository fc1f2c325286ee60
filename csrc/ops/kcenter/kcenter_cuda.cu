// CUDA k-center greedy: one or two launches per step, no host synchronisation.
//
// Why this shape: a host round trip per step (.item() of an argmax) would cost more than the
// step, so step t is a launch (or two) that
//   1. reads the row chosen at step t-1 from device memory (indices[t-1]),
//   2. lowers every unselected row's distance to the chosen set by its distance to that row
//      (a direct sum of squared differences in float32, one warp per distance), and marks the
//      chosen row as selected (-1, below every distance),
//   3. reduces its rows to one (largest distance, lowest index) pair per block, and
//   4. has the last block to finish (an atomic ticket after a memory fence) reduce the blocks'
//      pairs and write indices[t] and radii[t] for the next launch.
// All launches go on the current stream under a device guard; the host never waits.
//
// Two paths (FASTAD_KCENTER_CUDA_PATH, read on every call):
//   pruned            each row also keeps which chosen row is its nearest (assign) and, per step,
//                     a first launch measures the new centre's distance to every earlier centre.
//                     By the triangle inequality a row whose nearest centre is more than twice its
//                     distance away from the new centre cannot get nearer to it, so most rows
//                     cost 12 bytes of reads instead of a D-float distance once the selection has
//                     spread out (as the CPU kernel's lazy bounds do). The test keeps a relative
//                     margin (prune_margin) above float32 rounding, so a skipped row is one
//                     whose computed distance would not have lowered its own: the selection and
//                     radii equal the full path's bit for bit (tested).
//   full (default)    every row's distance to the new centre at every step (verified on an H200
//                     at 125d10d).
// The pruned path was written without a GPU at hand (2026-12-07), so it is opt-in until a GPU run
// verifies it (benchmarks/gpu_check.sh runs its tests and times it); then it should become the
// default (benchmarks/RESULTS.md, "Devices verified, per kernel").
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fastad/cuda_warp.cuh"
#include "fastad/env_choice.h"
#include "kcenter.h"

namespace fastad {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kBlocksPerSm = 4;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kSelected = -1.0f;  // below every distance: a chosen row never wins again
constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();
// The pruning test and why it is exact. With C the computed squared distance of the row's nearest
// centre to the new one, M the row's own and D the row's to the new centre, each with relative
// error at most delta, the triangle inequality gives D >= M when C > 4 (1 + eps) M and
// (2 rho - 1)^2 (1 - delta) / (1 + delta) >= 1, rho = sqrt((1 + eps) (1 - delta) / (1 + delta)):
// that holds for delta up to about eps / 3. A warp's sum of D squares in float32 errs by at most
// about (ceil(D / 32) + 7) 2^-24 relative, so eps = max(1e-3, 6 (ceil(D / 32) + 7) 2^-24) keeps
// every skip exact (prune_margin). Relative error bounds fail for subnormal squares, so a row
// whose distance is below kMinPrunable is always computed.
constexpr float kMinPrunable = 1e-30f;

// 4 (1 + eps) for rows of d features (see above).
float prune_margin(int64_t d) {
  const double rounding = 6.0 * static_cast<double>((d + 31) / 32 + 7) * std::ldexp(1.0, -24);
  return static_cast<float>(4.0 * (1.0 + std::max(1e-3, rounding)));
}

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

// The pruned path's extra state.
struct PruneState {
  int32_t* assign;  // (n) place in indices of each row's nearest chosen row (once min_d < inf)
  float* centre_d;  // (k) squared distance of each earlier centre to the newest one, this step
  float margin;     // prune_margin(d)
};

// Steps 3 and 4 of a step: this thread's best pair into the block's, the block's into block_v /
// block_i, and in the last block to finish, the choice of row t. Called by every thread.
__device__ __forceinline__ void finish_step(float best_v, int64_t best_i, int64_t t,
                                            const StepState& s, float* sv, int64_t* si,
                                            bool* last_block) {
  block_best(best_v, best_i, sv, si);
  if (threadIdx.x == 0) {
    s.block_v[blockIdx.x] = best_v;
    s.block_i[blockIdx.x] = best_i;
    __threadfence();  // this block's pair is visible device-wide before its ticket is
    *last_block = atomicAdd(s.ticket, 1u) == gridDim.x - 1;
    if (*last_block) __threadfence();  // acquire side: the other blocks' pairs are read after this
  }
  __syncthreads();
  if (!*last_block) return;

  // The last block: every other block's pair is written. __ldcg reads through L2, never a stale
  // L1 line from an earlier step on this SM.
  float v = kSelected - 1.0f;
  int64_t i = kNoRow;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
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

// Full path, step t (1 <= t < k): fold in the row chosen at step t-1, then choose row t. One warp
// per row.
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
  finish_step(best_v, best_i, t, s, sv, si, &last_block);
}

// Pruned path, first launch of step t (t >= 2): centre_d[j] = squared distance of centre j to the
// newest centre indices[t-1], for j < t-1. One warp per centre.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    kcenter_centre_distances_kernel(const scalar_t* __restrict__ x, int64_t d,
                                    const int64_t* __restrict__ indices, int64_t t,
                                    float* __restrict__ centre_d) {
  const int lane = threadIdx.x % kWarp;
  const scalar_t* crow = x + indices[t - 1] * d;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       j < t - 1; j += warps) {
    const float dist = warp_sq_dist(x + indices[j] * d, 1, crow, 1, d, lane);
    if (lane == 0) centre_d[j] = dist;
  }
}

// Pruned path, second launch of step t: one thread per row decides whether the new centre can
// lower the row's distance; the warp then computes the distances its lanes asked for, one row at
// a time, all 32 lanes on each (coalesced reads, the full path's summation order).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    kcenter_pruned_step_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t d, int64_t t,
                               StepState s, PruneState p) {
  __shared__ float sv[kWarpsPerBlock];
  __shared__ int64_t si[kWarpsPerBlock];
  __shared__ bool last_block;
  const int lane = threadIdx.x % kWarp;
  const int64_t chosen = s.indices[t - 1];
  const scalar_t* crow = x + chosen * d;
  const int32_t newest = static_cast<int32_t>(t - 1);  // the new centre's place in indices

  float best_v = kSelected - 1.0f;
  int64_t best_i = kNoRow;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // A warp takes 32 consecutive rows at a time, so its loop count is warp-uniform.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + (threadIdx.x / kWarp) * kWarp;
       base < n; base += stride) {
    const int64_t r = base + lane;
    const bool mine = r < n;
    float m = mine ? s.min_d[r] : kSelected;
    bool needs_distance = false;
    if (mine && m != kSelected) {
      if (r == chosen) {
        m = kSelected;
        s.min_d[r] = kSelected;
      } else {
        // dist(r, new) >= dist(nearest, new) - dist(r, nearest): when the first is more than
        // twice sqrt(m) (with the margin), the new centre is no nearer than the row's nearest
        // one. A row still at +inf (no centre measured yet) or below kMinPrunable always
        // computes; a NaN centre distance fails the test too.
        needs_distance =
            !(isfinite(m) && m >= kMinPrunable && p.centre_d[p.assign[r]] > p.margin * m);
      }
    }
    for (unsigned todo = __ballot_sync(kFullMask, needs_distance); todo != 0u; todo &= todo - 1u) {
      const int src = __ffs(todo) - 1;
      const int64_t row = base + src;
      float dist = warp_sq_dist(x + row * d, 1, crow, 1, d, lane);
      if (isnan(dist)) dist = kInf;
      if (lane == src && dist < m) {
        m = dist;
        s.min_d[row] = dist;
        p.assign[row] = newest;
      }
    }
    if (mine && better(m, r, best_v, best_i)) {
      best_v = m;
      best_i = r;
    }
  }
  finish_step(best_v, best_i, t, s, sv, si, &last_block);
}

// Whether this call takes the pruned path: FASTAD_KCENTER_CUDA_PATH=pruned (full: the default).
bool use_pruned_path() { return env_choice("FASTAD_KCENTER_CUDA_PATH", {"pruned", "full"}) == 0; }

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

  // assign holds places in indices as int32: k above that takes the full path.
  const bool pruned = use_pruned_path() && k <= std::numeric_limits<int32_t>::max();
  // The full path's steps give each row a warp, the pruned path's a thread.
  const int64_t rows_per_block = pruned ? kThreads : kWarpsPerBlock;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(sms) * kBlocksPerSm,
                                             (n + rows_per_block - 1) / rows_per_block));
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
  // Zeros, not garbage: a row's assign and centre_d are read only once it has a finite distance,
  // but nothing read is ever uninitialised memory.
  at::Tensor assign = pruned ? at::zeros({n}, opts.dtype(at::kInt)) : at::Tensor();
  at::Tensor centre_d = pruned ? at::zeros({k}, opts.dtype(at::kFloat)) : at::Tensor();
  const PruneState prune{pruned ? assign.mutable_data_ptr<int32_t>() : nullptr,
                         pruned ? centre_d.mutable_data_ptr<float>() : nullptr, prune_margin(d)};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Only the dtypes the op accepts: no double kernel that could never run.
  AT_DISPATCH_V2(x.scalar_type(), "kcenter_greedy_cuda", AT_WRAP([&] {
                   const scalar_t* xp = x.const_data_ptr<scalar_t>();
                   const auto grid = static_cast<unsigned>(blocks);
                   for (int64_t t = 1; t < k; ++t) {
                     if (!pruned) {
                       kcenter_step_kernel<scalar_t>
                           <<<grid, kThreads, 0, stream>>>(xp, n, d, t, state);
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                       continue;
                     }
                     if (t >= 2) {  // the earlier centres' distances to the newest one
                       const int64_t centre_blocks =
                           std::min<int64_t>(static_cast<int64_t>(sms) * kBlocksPerSm,
                                             (t - 1 + kWarpsPerBlock - 1) / kWarpsPerBlock);
                       kcenter_centre_distances_kernel<scalar_t>
                           <<<static_cast<unsigned>(centre_blocks), kThreads, 0, stream>>>(
                               xp, d, state.indices, t, prune.centre_d);
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                     }
                     kcenter_pruned_step_kernel<scalar_t>
                         <<<grid, kThreads, 0, stream>>>(xp, n, d, t, state, prune);
                     C10_CUDA_KERNEL_LAUNCH_CHECK();
                   }
                 }),
                 at::kFloat, at::kHalf, at::kBFloat16);
  return {indices, radii};
}

TORCH_LIBRARY_IMPL(fastad, CUDA, m) { m.impl("kcenter_greedy", &kcenter_greedy_cuda); }

}  // namespace fastad
