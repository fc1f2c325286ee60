// CUDA kNN: the GPU twin of the CPU kernel's design (knn_cpu_internal.h): a cheap screen with a
// proven error bound, and exact re-ranking of every bank row the screen cannot rule out.
//
// Why this shape:
//  * Memory is bounded: the M x N distance matrix is never built. Query blocks (<= 8192 rows)
//    meet bank tiles (<= 8192 rows) one at a time; the cross term q.b of each pair is one cuBLAS
//    GEMM (at::mm) into a reused float32 tile (<= 256 MB).
//  * Both sides are centred on the bank's mean before the GEMM. Distances do not change, but the
//    norms shrink, and with them the cancellation error of d ~ |q|^2 + |b|^2 - 2 q.b: CNN features
//    are non-negative and sit far from the origin.
//  * The screen: each tile entry gives a lower bound d - eps (|q|^2 + |b|^2) on the squared
//    distance, where eps bounds the float32 rounding of centring, norms, GEMM and expansion (and
//    of TF32/bf16 inputs when the user's float32 matmul precision allows them). A row whose bound
//    exceeds the query's current k-th exact distance cannot enter; almost all rows fail here with
//    one comparison and a warp ballot.
//  * Survivors get their distance computed directly from the original rows (sum of squared
//    differences, one warp per survivor) and compete in (distance, index) order for a sorted list
//    of length k per query row, kept in global memory across tiles. So the result is exact whatever
//    the GEMM's precision, ties between duplicate rows included, and any runtime k (up to N) works.
//  * Order is (distance, index) lexicographic with NaN as +inf, exactly as fastad/topk.h. Lists
//    start as (+inf, INT64_MAX) sentinels that every real candidate beats, so with k <= N all
//    returned indices are real rows in [0, N), whatever the inputs hold.
//  * Half/bfloat16 inputs are widened per block/tile only, so extra memory stays O(tile * D).
//  * Everything is enqueued on the current stream under a device guard: no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Context.h>
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
#include "knn.h"

namespace fastad {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kQueryBlock = 8192;  // Mt: query rows per GEMM
constexpr int64_t kBankTile = 8192;    // Nt: bank rows per GEMM; tile <= 8192^2 floats = 256 MB
// Each lane loads this many tile entries before screening them, so that a warp has several loads
// in flight: with few query rows there are too few warps per SM to hide latency otherwise.
constexpr int kUnroll = 4;
// Grid-stride kernels need no more blocks than this to fill any current GPU.
constexpr int64_t kMaxBlocks = 65535;
// The screen kernel gives each query row of a block its own warp (no grid-stride loop).
static_assert(kQueryBlock <= kMaxBlocks * kWarpsPerBlock, "query block too tall for one grid");

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kSentinelIndex = std::numeric_limits<int64_t>::max();

// True when (da, ia) ranks before (db, ib): smaller distance, ties to the smaller index.
// Callers have already mapped NaN to +inf.
__device__ __forceinline__ bool ranks_before(float da, int64_t ia, float db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

__device__ __forceinline__ float nan_to_inf(float v) { return isnan(v) ? kInf : v; }

int64_t blocks_for(int64_t work_items, int64_t items_per_block) {
  return std::max<int64_t>(
      1, std::min(kMaxBlocks, (work_items + items_per_block - 1) / items_per_block));
}

// Squared L2 norm of every row of a contiguous float (rows, d) block; one warp per row,
// accumulated in double so that the norms' own rounding is one float rounding.
__global__ void row_sq_norms_kernel(const float* __restrict__ x, int64_t rows, int64_t d,
                                    float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < rows; r += warps) {
    const float* row = x + r * d;
    double acc = 0.0;
    for (int64_t c = lane; c < d; c += kWarp) {
      const double v = row[c];
      acc += v * v;
    }
    acc = warp_sum(acc);
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
__device__ void warp_merge_into_list(float* ld, int64_t* li, int64_t k, float nd, int64_t ni, int s,
                                     int lane, int64_t* counts /* 32 per warp, shared */) {
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

// Where the screen of one tile reads its inputs and the exact re-ranking its rows.
template <typename scalar_t>
struct TileArgs {
  const float* tile;  // (mb, nb) row-major cross terms of the centred rows
  int64_t mb, nb;
  const float* qn;  // (mb) squared norms of the centred query rows
  const float* bn;  // (nb) squared norms of the centred bank rows
  int64_t n0;       // bank row of tile column 0
  int64_t k;
  float eps;          // lower bound = d_approx - eps * (|q|^2 + |b|^2)
  float inflate;      // the k-th exact distance is inflated by the rounding of a direct sum
  const scalar_t* q;  // original query, already offset to the block's first row
  int64_t qs0, qs1;
  const scalar_t* b;  // original bank
  int64_t bs0, bs1, d;
  float* ld_all;  // (mb, k) sorted lists, already offset to the block's first row
  int64_t* li_all;
};

// Screens one tile against each query row's k best and re-ranks the survivors exactly; one warp
// per query row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) screen_tile_kernel(const TileArgs<scalar_t> a) {
  __shared__ int64_t counts[kWarpsPerBlock][kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= a.mb) return;  // whole warp leaves together

  const float* trow = a.tile + row * a.nb;
  const float q2 = a.qn[row];
  const scalar_t* qrow = a.q + row * a.qs0;
  float* ld = a.ld_all + row * a.k;
  int64_t* li = a.li_all + row * a.k;
  float kth_d = ld[a.k - 1];
  int64_t kth_i = li[a.k - 1];
  float bound = kth_d * a.inflate;

  for (int64_t c0 = 0; c0 < a.nb; c0 += kUnroll * kWarp) {
    float t[kUnroll], bq[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kWarp + lane;
      t[u] = c < a.nb ? trow[c] : 0.0f;
      bq[u] = c < a.nb ? a.bn[c] : kInf;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kWarp + lane;
      const float s = q2 + bq[u];
      const float lower = (s - 2.0f * t[u]) - a.eps * s;
      // NaN bounds pass: a non-finite row is re-ranked rather than trusted.
      const bool pass = c < a.nb && !(lower > bound);
      const unsigned ballot = __ballot_sync(kFullMask, pass);
      if (ballot == 0) continue;  // the common case once the list holds good rows

      float e = kInf;
      for (unsigned bits = ballot; bits != 0; bits &= bits - 1) {
        const int src = __ffs(bits) - 1;
        const int64_t j = a.n0 + c0 + u * kWarp + src;
        const float dj = warp_sq_dist(qrow, a.qs1, a.b + j * a.bs0, a.bs1, a.d, lane);
        if (lane == src) e = nan_to_inf(dj);
      }
      int64_t i = a.n0 + c;
      const bool enters = pass && ranks_before(e, i, kth_d, kth_i);
      const unsigned entering = __ballot_sync(kFullMask, enters);
      if (entering == 0) continue;
      if (!enters) {  // losers sort to the back, behind every entrant
        e = kInf;
        i = kSentinelIndex;
      }
      warp_sort_pairs(e, i, lane);
      warp_merge_into_list(ld, li, a.k, e, i, __popc(entering), lane, counts[warp]);
      kth_d = ld[a.k - 1];
      kth_i = li[a.k - 1];
      bound = kth_d * a.inflate;
    }
  }
}

// The screen's eps: float32 rounding of centring, norms, the GEMM's sums (gamma_D) and the
// expansion. When torch lets cuBLAS use TF32 for float32 matmuls, add the rounding of the two
// truncated inputs (2^-9) and double the sum term: tensor cores accumulate with truncation.
// Newer torch refuses to answer the legacy precision query when the user mixed the legacy and
// the new precision APIs; then the wider bound is taken, which is always safe.
float screen_eps(int64_t d) {
  const double u = std::ldexp(1.0, -24);
  bool may_use_tf32 = true;
  try {
    may_use_tf32 =
        at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
  } catch (const c10::Error&) {
  }
  const double eps = may_use_tf32
                         ? 2.2 * static_cast<double>(d + 16) * u + 1.01 * std::ldexp(1.0, -9)
                         : 1.1 * static_cast<double>(d + 16) * u;
  return static_cast<float>(eps);
}

// (rows, d) float32 contiguous copy of x's rows [r0, r0 + rows) minus the centre.
at::Tensor centred_rows(const at::Tensor& x, int64_t r0, int64_t rows, const at::Tensor& centre) {
  return at::sub(x.narrow(0, r0, rows).to(at::kFloat), centre).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query_in, const at::Tensor& bank_in,
                                            int64_t k, bool squared,
                                            const std::optional<at::Tensor>& prepared) {
  check_knn_args(query_in, bank_in, k);
  check_knn_cuda_prepared(query_in, prepared);
  const c10::cuda::CUDAGuard guard(query_in.device());
  // Row-major rows make the survivors' exact distances coalesced reads (a no-op when they are).
  const at::Tensor query = query_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const int64_t m = query.size(0), n = bank.size(0), d = query.size(1);
  const auto fopts = query.options().dtype(at::kFloat);

  // The (M, k) lists double as the outputs; the sentinels guarantee real indices at the end.
  at::Tensor dist = at::full({m, k}, kInf, fopts);
  at::Tensor idx = at::full({m, k}, kSentinelIndex, query.options().dtype(at::kLong));
  if (m == 0) return {dist, idx};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t mt = std::min(m, kQueryBlock);
  const int64_t nt = std::min(n, kBankTile);

  // The bank's mean, summed tile by tile in double (no widened copy of the whole bank). Non-finite
  // columns centre on 0 instead: the centre only has to be finite, not good.
  at::Tensor centre = at::zeros({d}, fopts.dtype(at::kDouble));
  for (int64_t n0 = 0; n0 < n; n0 += nt)
    centre.add_(bank.narrow(0, n0, std::min(nt, n - n0)).sum(0, false, at::kDouble));
  centre = at::nan_to_num(centre.div_(static_cast<double>(n)), 0.0, 0.0, 0.0).to(at::kFloat);

  const float eps = screen_eps(d);
  const float inflate = 1.0f + static_cast<float>(d + 8) * 1.2e-7f;
  at::Tensor tile_storage = at::empty({mt * nt}, fopts);
  at::Tensor qn = at::empty({mt}, fopts);
  at::Tensor bn = at::empty({nt}, fopts);

  for (int64_t m0 = 0; m0 < m; m0 += mt) {
    const int64_t mb = std::min(mt, m - m0);
    const at::Tensor qblock = centred_rows(query, m0, mb, centre);
    row_sq_norms_kernel<<<blocks_for(mb, kWarpsPerBlock), kThreads, 0, stream>>>(
        qblock.const_data_ptr<float>(), mb, d, qn.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t n0 = 0; n0 < n; n0 += nt) {
      const int64_t nb = std::min(nt, n - n0);
      const at::Tensor btile = centred_rows(bank, n0, nb, centre);
      row_sq_norms_kernel<<<blocks_for(nb, kWarpsPerBlock), kThreads, 0, stream>>>(
          btile.const_data_ptr<float>(), nb, d, bn.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor tile = tile_storage.narrow(0, 0, mb * nb).view({mb, nb});
      at::mm_out(tile, qblock, btile.t());

      // Only the dtypes the op accepts: no double kernel that could never run.
      AT_DISPATCH_V2(query.scalar_type(), "knn_cuda", AT_WRAP([&] {
                       TileArgs<scalar_t> args{
                           tile.const_data_ptr<float>(),
                           mb,
                           nb,
                           qn.const_data_ptr<float>(),
                           bn.const_data_ptr<float>(),
                           n0,
                           k,
                           eps,
                           inflate,
                           query.const_data_ptr<scalar_t>() + m0 * query.stride(0),
                           query.stride(0),
                           query.stride(1),
                           bank.const_data_ptr<scalar_t>(),
                           bank.stride(0),
                           bank.stride(1),
                           d,
                           dist.mutable_data_ptr<float>() + m0 * k,
                           idx.mutable_data_ptr<int64_t>() + m0 * k};
                       screen_tile_kernel<scalar_t>
                           <<<blocks_for(mb, kWarpsPerBlock), kThreads, 0, stream>>>(args);
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                     }),
                     at::kFloat, at::kHalf, at::kBFloat16);
    }
  }

  // The lists hold exact squared distances in (distance, index) order; sums of squares are never
  // negative, so only the root remains.
  if (!squared) dist.sqrt_();
  return {dist, idx};
}

// Nothing to prepare on CUDA: an empty byte tensor, which knn_cuda accepts.
at::Tensor knn_prepare_cuda(const at::Tensor& bank) {
  check_knn_bank(bank);
  return at::empty({0}, bank.options().dtype(at::kByte));
}

TORCH_LIBRARY_IMPL(fastad, CUDA, m) {
  m.impl("knn", &knn_cuda);
  m.impl("knn_prepare", &knn_prepare_cuda);
}

}  // namespace fastad
