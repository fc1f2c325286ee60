// CUDA kNN: the GPU twin of knn_cpu.cpp's float32 GEMM-tile path.
//
// Why this shape:
//  * Memory is bounded: the M x N distance matrix is never built. Query blocks (<= 8192 rows)
//    meet bank tiles (<= 8192 rows) one at a time; the cross term q.b of each pair is one cuBLAS
//    GEMM into a reused float32 tile (<= 256 MB), turned into d = |q|^2 + |b|^2 - 2 q.b on the fly.
//  * The GEMM is where the FLOPs are, so it goes to cuBLAS. It runs in float32 without TF32
//    (PyTorch's default for matmul), because TF32's 10-bit mantissa would change which rows win.
//  * Half/bfloat16 inputs are widened per block/tile only, so the extra memory stays O(tile * D).
//  * Selection is one warp per query row. Almost every tile entry loses against the row's current
//    k-th best, so the common path is one comparison plus a warp ballot; the rare survivors are
//    sorted within the warp and merged into a sorted (dist, index) list of length k kept in global
//    memory across tiles. Global lists make any runtime k (up to N) work with the same code.
//  * The norm expansion loses precision to cancellation when points are close relative to their
//    norms, so the k winners' distances are recomputed directly as sums of squared differences
//    from the original rows and then re-sorted; only the choice of the k rows relies on the GEMM.
//  * Order is (distance, index) lexicographic with NaN as +inf, exactly as fastad/topk.h. Lists
//    start as (+inf, INT64_MAX) sentinels that every real candidate beats, so with k <= N all
//    returned indices are real rows in [0, N), whatever the inputs hold.
//  * Everything is enqueued on the current stream: no host synchronisation anywhere.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "knn.h"

namespace fastad {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kQueryBlock = 8192;  // Mt: query rows per GEMM
constexpr int64_t kBankTile = 8192;    // Nt: bank rows per GEMM; tile <= 8192^2 floats = 256 MB
// Rows with k up to this are re-sorted by one thread each (insertion sort, the list is nearly
// sorted already); longer rows go to PyTorch's segmented sort, which has no k^2 worst case.
constexpr int64_t kInsertionSortMaxK = 64;
// Grid-stride kernels need no more blocks than this to fill any current GPU.
constexpr int64_t kMaxBlocks = 65535;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kSentinelIndex = std::numeric_limits<int64_t>::max();

// True when (da, ia) ranks before (db, ib): smaller distance, ties to the smaller index.
// Callers have already mapped NaN to +inf.
__device__ __forceinline__ bool ranks_before(float da, int64_t ia, float db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

__device__ __forceinline__ float nan_to_inf(float v) { return isnan(v) ? kInf : v; }

int64_t blocks_for(int64_t work_items, int64_t items_per_block) {
  return std::max<int64_t>(1, std::min(kMaxBlocks, (work_items + items_per_block - 1) / items_per_block));
}

// Squared L2 norm of every row of x (rows, d), read with its own strides and dtype; one warp per
// row. Accumulated in double like the CPU path: the norms enter every approximate distance.
template <typename scalar_t>
__global__ void row_sq_norms_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t d,
                                    int64_t s0, int64_t s1, float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < rows; r += warps) {
    const scalar_t* row = x + r * s0;
    double acc = 0.0;
    for (int64_t c = lane; c < d; c += kWarp) {
      const double v = static_cast<float>(row[c * s1]);
      acc += v * v;
    }
    for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (lane == 0) out[r] = static_cast<float>(acc);
  }
}

// Sorts one (dist, idx) pair per lane ascending across the warp (bitonic network, 15 steps).
__device__ __forceinline__ void warp_sort_pairs(float& d, int64_t& i, int lane) {
  for (int size = 2; size <= kWarp; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const float od = __shfl_xor_sync(kFullMask, d, stride);
      const int64_t oi = __shfl_xor_sync(kFullMask, i, stride);
      const bool ascending = (lane & size) == 0;
      const bool keep_min = ((lane & stride) == 0) == ascending;
      const bool take = keep_min ? ranks_before(od, oi, d, i) : ranks_before(d, i, od, oi);
      if (take) {
        d = od;
        i = oi;
      }
    }
  }
}

// Merges s (1..32) new pairs, sorted across lanes 0..s-1 (lanes >= s hold filler), into the
// sorted list (ld, li) of length k, keeping the k best. All keys are distinct except the
// identical (+inf, INT64_MAX) sentinels at the list's tail, which every new pair beats.
//
// Every entry moves to its rank in the merged order:
//   new pair l   -> l + c_l, where c_l = number of list entries ranking before it;
//   list entry j -> j + #{l : c_l <= j}   (new pair l ranks before entry j exactly when j >= c_l).
// Entries only move towards the tail, so the list is shifted in place in chunks of 32 from the
// tail down to c_0; everything before c_0 stays put. Ranks >= k fall off the end.
__device__ void warp_merge_into_list(float* ld, int64_t* li, int64_t k, float nd, int64_t ni,
                                     int s, int lane, int64_t* counts /* 32 per warp, shared */) {
  int64_t c = k;  // filler lanes: larger than every j < k, so they never count
  if (lane < s) {
    int64_t lo = 0, hi = k;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (ranks_before(ld[mid], li[mid], nd, ni))
        lo = mid + 1;
      else
        hi = mid;
    }
    c = lo;
  }
  counts[lane] = c;  // nondecreasing in lane, since the new pairs are sorted
  const int64_t first = __shfl_sync(kFullMask, c, 0);
  __syncwarp();

  for (int64_t top = k; top > first; top -= kWarp) {
    const int64_t j = top - kWarp + lane;
    const bool active = j >= first;
    float dj = 0.0f;
    int64_t ij = 0, dest = k;
    if (active) {
      dj = ld[j];
      ij = li[j];
      int lo = 0, hi = kWarp;  // upper bound of j in counts[0..32)
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (counts[mid] <= j)
          lo = mid + 1;
        else
          hi = mid;
      }
      dest = j + lo;
    }
    __syncwarp();  // every lane has read its entry before any lane overwrites one
    if (active && dest < k) {
      ld[dest] = dj;
      li[dest] = ij;
    }
    __syncwarp();
  }
  if (lane < s && lane + c < k) {
    ld[lane + c] = nd;
    li[lane + c] = ni;
  }
  __syncwarp();  // the list is complete and visible to the whole warp
}

// Offers one tile of approximate distances to the rows' top-k lists; one warp per query row.
//   tile   (mb, nb) row-major cross terms q.b for query rows m0.. and bank rows n0..
//   qn, bn squared norms, already offset to m0 and n0
//   ld, li (mb, k) lists, already offset to row m0
__global__ void __launch_bounds__(kThreads)
    select_tile_kernel(const float* __restrict__ tile, int64_t mb, int64_t nb,
                       const float* __restrict__ qn, const float* __restrict__ bn, int64_t n0,
                       int64_t k, float* ld_all, int64_t* li_all) {
  __shared__ int64_t counts[kWarpsPerBlock][kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= mb) return;  // whole warp leaves together

  const float* trow = tile + row * nb;
  const float q2 = qn[row];
  float* ld = ld_all + row * k;
  int64_t* li = li_all + row * k;
  float kth_d = ld[k - 1];
  int64_t kth_i = li[k - 1];

  for (int64_t c0 = 0; c0 < nb; c0 += kWarp) {
    const int64_t c = c0 + lane;
    float d = kInf;
    int64_t i = kSentinelIndex;
    bool enters = false;
    if (c < nb) {
      d = nan_to_inf(q2 + bn[c] - 2.0f * trow[c]);
      i = n0 + c;
      enters = ranks_before(d, i, kth_d, kth_i);
    }
    const unsigned ballot = __ballot_sync(kFullMask, enters);
    if (ballot == 0) continue;  // the common case once the list has filled with good rows

    if (!enters) {  // losers sort to the back, behind every survivor
      d = kInf;
      i = kSentinelIndex;
    }
    warp_sort_pairs(d, i, lane);
    warp_merge_into_list(ld, li, k, d, i, __popc(ballot), lane, counts[warp]);
    kth_d = ld[k - 1];
    kth_i = li[k - 1];
  }
}

// Replaces each selected distance by the direct sum of squared differences of the original rows
// (read with their own strides and dtype); one warp per (query row, list entry).
template <typename scalar_t>
__global__ void recompute_distances_kernel(const scalar_t* __restrict__ q, int64_t qs0,
                                           int64_t qs1, const scalar_t* __restrict__ b,
                                           int64_t bs0, int64_t bs1, int64_t m, int64_t k,
                                           int64_t d, float* __restrict__ dist,
                                           const int64_t* __restrict__ idx) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t total = m * k;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       e < total; e += warps) {
    const scalar_t* qr = q + (e / k) * qs0;
    const scalar_t* br = b + idx[e] * bs0;
    float acc = 0.0f;
    for (int64_t c = lane; c < d; c += kWarp) {
      const float x = static_cast<float>(qr[c * qs1]) - static_cast<float>(br[c * bs1]);
      acc = fmaf(x, x, acc);
    }
    for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (lane == 0) dist[e] = nan_to_inf(acc);
  }
}

// Short rows: one thread re-sorts its row by (dist, index), then clamps and takes the root.
// Recomputation only reorders near-ties, so insertion sort does little work here.
__global__ void sort_finish_kernel(float* __restrict__ dist, int64_t* __restrict__ idx, int64_t m,
                                   int64_t k, bool squared) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < m;
       r += stride) {
    float* d = dist + r * k;
    int64_t* ix = idx + r * k;
    for (int64_t j = 1; j < k; ++j) {
      const float dj = d[j];
      const int64_t ij = ix[j];
      int64_t p = j;
      while (p > 0 && ranks_before(dj, ij, d[p - 1], ix[p - 1])) {
        d[p] = d[p - 1];
        ix[p] = ix[p - 1];
        --p;
      }
      d[p] = dj;
      ix[p] = ij;
    }
    for (int64_t j = 0; j < k; ++j) {
      const float v = fmaxf(d[j], 0.0f);
      d[j] = squared ? v : sqrtf(v);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query, const at::Tensor& bank,
                                            int64_t k, bool squared) {
  check_knn_args(query, bank, k);
  TORCH_CHECK(query.is_cuda(), "knn_cuda expects CUDA tensors, got ", query.device());
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t m = query.size(0), n = bank.size(0), d = query.size(1);
  const auto fopts = query.options().dtype(at::kFloat);

  // The (M, k) lists double as the outputs; the sentinels guarantee real indices at the end.
  at::Tensor dist = at::full({m, k}, kInf, fopts);
  at::Tensor idx = at::full({m, k}, kSentinelIndex, query.options().dtype(at::kLong));
  if (m == 0) return {dist, idx};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor qn = at::empty({m}, fopts);
  at::Tensor bn = at::empty({n}, fopts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "knn_cuda_norms", [&] {
    row_sq_norms_kernel<scalar_t><<<blocks_for(m, kWarpsPerBlock), kThreads, 0, stream>>>(
        query.const_data_ptr<scalar_t>(), m, d, query.stride(0), query.stride(1),
        qn.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_sq_norms_kernel<scalar_t><<<blocks_for(n, kWarpsPerBlock), kThreads, 0, stream>>>(
        bank.const_data_ptr<scalar_t>(), n, d, bank.stride(0), bank.stride(1),
        bn.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const int64_t mt = std::min(m, kQueryBlock);
  const int64_t nt = std::min(n, kBankTile);
  at::Tensor tile_storage = at::empty({mt * nt}, fopts);

  for (int64_t m0 = 0; m0 < m; m0 += mt) {
    const int64_t mb = std::min(mt, m - m0);
    // No copy for float32 input; at::mm copies itself if the strides do not suit cuBLAS.
    const at::Tensor qblock = query.narrow(0, m0, mb).to(at::kFloat);
    for (int64_t n0 = 0; n0 < n; n0 += nt) {
      const int64_t nb = std::min(nt, n - n0);
      const at::Tensor btile = bank.narrow(0, n0, nb).to(at::kFloat);
      at::Tensor tile = tile_storage.narrow(0, 0, mb * nb).view({mb, nb});
      at::mm_out(tile, qblock, btile.t());

      select_tile_kernel<<<blocks_for(mb, kWarpsPerBlock), kThreads, 0, stream>>>(
          tile.const_data_ptr<float>(), mb, nb, qn.const_data_ptr<float>() + m0,
          bn.const_data_ptr<float>() + n0, n0, k, dist.mutable_data_ptr<float>() + m0 * k,
          idx.mutable_data_ptr<int64_t>() + m0 * k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "knn_cuda_recompute", [&] {
    recompute_distances_kernel<scalar_t><<<blocks_for(m * k, kWarpsPerBlock), kThreads, 0, stream>>>(
        query.const_data_ptr<scalar_t>(), query.stride(0), query.stride(1),
        bank.const_data_ptr<scalar_t>(), bank.stride(0), bank.stride(1), m, k, d,
        dist.mutable_data_ptr<float>(), idx.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  if (k <= kInsertionSortMaxK) {
    sort_finish_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(
        dist.mutable_data_ptr<float>(), idx.mutable_data_ptr<int64_t>(), m, k, squared);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dist, idx};
  }

  // Long rows: (dist, index) order from two stable sorts, by index first and then by distance
  // (NaN is already +inf, so the float sort sees only ordered values).
  const auto by_index = at::sort(idx, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor idx1 = std::get<0>(by_index);
  const at::Tensor dist1 = dist.gather(1, std::get<1>(by_index));
  const auto by_dist = at::sort(dist1, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  at::Tensor out_dist = std::get<0>(by_dist).clamp_min_(0.0);
  if (!squared) out_dist.sqrt_();
  return {out_dist, idx1.gather(1, std::get<1>(by_dist))};
}

TORCH_LIBRARY_IMPL(fastad, CUDA, m) { m.impl("knn", &knn_cuda); }

}  // namespace fastad
