// CUDA squared Mahalanobis distances: one block per position (and chunk of samples), one thread
// per sample, the position's factor staged through shared memory in tiles.
//
// Why this shape (kept simple; where it has run: see mahalanobis.h):
//  * Every sample of a position needs the same factor, so a block owns a position and its
//    threads are samples: each tile of the factor is loaded from global memory once per block
//    and read by all threads from shared memory (all threads read the same word: a broadcast).
//  * The output columns are taken kTileCols at a time; a thread keeps those kTileCols partial
//    inner products in registers while the tiles of factor rows i >= j0 (kTileRows rows each)
//    go past, then adds their squares to its total. Shared memory is one kTileRows x kTileCols
//    tile (4 KB) whatever D is, so every D works.
//  * A tile entry is read from L only on or below the diagonal (j <= i < D); every other entry is
//    written as 0 without reading, so the upper triangle is never touched.
//  * Threads past the end of the batch take part in every __syncthreads (all loops are uniform
//    across the block) with centred values of 0, and write nothing.
//  * Each thread reads its own row of x (contiguous); rows are re-read once per column panel,
//    from cache.
// 64-bit offsets throughout; grid-stride loops over positions and sample chunks, so any P and B
// fit in the grid limits. Device guard, current stream, launch check; no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mahalanobis.h"

namespace fastad {
namespace {

constexpr int kTileRows = 32;  // factor rows i per shared-memory tile
constexpr int kTileCols = 32;  // output columns j per panel: partial sums each thread keeps
constexpr int kMaxThreads = 128;
constexpr int64_t kMaxGridY = 65535;

// out[b, p] for the samples b of this block's chunks, at this block's positions.
//   x (B, P, D), mean (mean rows, D), L (Q, D, D), out (B, P): all contiguous float32.
//   mean_step, factor_step: floats between two positions' means / factors (0 when shared).
__global__ void __launch_bounds__(kMaxThreads)
    mahalanobis_kernel(const float* __restrict__ x, const float* __restrict__ mean,
                       const float* __restrict__ L, float* __restrict__ out, int64_t b_size,
                       int64_t p_size, int64_t d, int64_t mean_step, int64_t factor_step) {
  __shared__ float tile[kTileRows][kTileCols];
  const int64_t threads = blockDim.x;
  for (int64_t p = blockIdx.x; p < p_size; p += gridDim.x) {
    const float* m = mean + p * mean_step;
    const float* f = L + p * factor_step;
    for (int64_t b0 = static_cast<int64_t>(blockIdx.y) * threads; b0 < b_size;
         b0 += static_cast<int64_t>(gridDim.y) * threads) {
      const int64_t b = b0 + threadIdx.x;
      const bool active = b < b_size;
      const float* xr = x + (active ? (b * p_size + p) * d : 0);
      float total = 0.0f;
      for (int64_t j0 = 0; j0 < d; j0 += kTileCols) {
        float y[kTileCols];
#pragma unroll
        for (int c = 0; c < kTileCols; ++c) y[c] = 0.0f;
        for (int64_t i0 = j0; i0 < d; i0 += kTileRows) {  // rows above j0 are zero in these columns
          __syncthreads();  // every thread is done with the previous tile
          for (int64_t e = threadIdx.x; e < kTileRows * kTileCols; e += threads) {
            const int64_t i = i0 + e / kTileCols, j = j0 + e % kTileCols;
            tile[e / kTileCols][e % kTileCols] = (i < d && j <= i) ? f[i * d + j] : 0.0f;
          }
          __syncthreads();
          const int rows = d - i0 < kTileRows ? static_cast<int>(d - i0) : kTileRows;
          for (int r = 0; r < rows; ++r) {
            const float ci = active ? xr[i0 + r] - m[i0 + r] : 0.0f;
#pragma unroll
            for (int c = 0; c < kTileCols; ++c) y[c] = fmaf(ci, tile[r][c], y[c]);
          }
        }
#pragma unroll
        for (int c = 0; c < kTileCols; ++c) total = fmaf(y[c], y[c], total);
      }
      if (active) out[b * p_size + p] = total;
    }
  }
}

}  // namespace

at::Tensor mahalanobis_cuda(const at::Tensor& x_in, const at::Tensor& mean_in,
                            const at::Tensor& L_in) {
  check_mahalanobis_args(x_in, mean_in, L_in);
  TORCH_CHECK(x_in.is_cuda(), "mahalanobis_cuda expects CUDA tensors, got x on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t b_size = x_in.size(0), p_size = x_in.size(1), d = x_in.size(2);
  at::Tensor out = at::empty({b_size, p_size}, x_in.options());
  if (b_size == 0 || p_size == 0) return out;
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous(), L = L_in.contiguous();

  const int64_t threads = std::min<int64_t>(kMaxThreads, (b_size + 31) / 32 * 32);
  const int64_t chunks = (b_size + threads - 1) / threads;
  const dim3 grid(
      static_cast<unsigned>(std::min<int64_t>(p_size, std::numeric_limits<int32_t>::max())),
      static_cast<unsigned>(std::min(chunks, kMaxGridY)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  mahalanobis_kernel<<<grid, static_cast<unsigned>(threads), 0, stream>>>(
      x.const_data_ptr<float>(), mean.const_data_ptr<float>(), L.const_data_ptr<float>(),
      out.mutable_data_ptr<float>(), b_size, p_size, d, mean.size(0) == 1 ? 0 : d,
      L.size(0) == 1 ? 0 : d * d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(fastad, CUDA, m) { m.impl("mahalanobis", &mahalanobis_cuda); }

}  // namespace fastad
