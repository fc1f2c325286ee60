// CUDA Orthogonal Matching Pursuit (Gram/Cholesky variant): the GPU twin of omp_cpu.cpp, with the
// same rules step for step (see omp.h).
//
// Why this shape (kept simple; where it has run: see omp.h):
//  * As on the CPU, the only large work is Xy = x D^T, so it goes to cuBLAS (at::matmul) one
//    tile of signals at a time (at most kXyTileFloats floats, never the whole (G, M, K)); the
//    tile of x is made contiguous first so that the GEMM, hence the result, does not depend on
//    x's strides.
//  * What is left per signal is small and sequential (s steps of K multiply-adds per selected
//    atom, an argmax, s x s triangular solves), so one thread runs one signal's whole pursuit, in
//    float64, exactly as omp_one in omp_cpu.cpp. Its working memory (K correlations, the s x s
//    Cholesky factor, ...) has runtime sizes, so it lives in one global scratch allocated once per
//    call; entry i of thread t sits at i * threads + t, so the threads of a warp, which walk their
//    arrays in step, touch consecutive words (coalesced).
//  * A block owns one group at a time (its threads are signals of that group), so when the group's
//    Gram (K x K doubles) fits in kMaxSharedGramBytes it is staged in shared memory once per block
//    and read from there; otherwise it is read from global memory (cached: it is small and shared
//    by every signal of the group).
//  * Threads are bounded (grid-stride loops over groups and signals) so that the scratch stays
//    below kScratchBytes whatever K and s are.
//  * The unit-norm check of the atoms runs on the device from the Gram diagonal; its verdict (the
//    first bad atom, or none) comes back in one 8-byte device-to-host read: the only host
//    synchronisation of the op, so that a bad dictionary raises the same error as on the CPU.
//  * A second path, one warp per signal (FASTAD_OMP_CUDA_PATH=warp, opt-in; written 2026-12-07
//    without a GPU, so unverified until a GPU run, see benchmarks/RESULTS.md): the K-long
//    correlation update and argmax are split over the warp's 32 lanes (32 times the parallelism
//    of the thread path, whose 20,000 signals leave most of a GPU idle), and lane 0 runs the
//    support update (omp_pursuit.h). Each alpha[i] is the same chain of fused multiply-adds, the
//    maximum is exact in any order and the first index reaching it is taken, so its codes equal
//    the thread path's bit for bit (tested).
// Device guard, current stream, launch check, 64-bit offsets throughout.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "fastad/cuda_warp.cuh"
#include "fastad/env_choice.h"
#include "omp.h"
#include "omp_pursuit.h"

namespace fastad {
namespace {

// Xy is computed this many floats at a time (16 MB): a tile, not the whole (G, M, K).
constexpr int64_t kXyTileFloats = int64_t{1} << 22;
constexpr int kMaxThreads = 128;                            // threads (signals) per block
constexpr int64_t kWarpsPerOmpBlock = kMaxThreads / kWarp;  // the warp path's signals per block
// Enough threads in flight to fill any current GPU; more only grows the scratch.
constexpr int64_t kMaxTotalThreads = int64_t{1} << 18;
// The per-thread scratch of all threads together stays below this (256 MB).
constexpr int64_t kScratchBytes = int64_t{1} << 28;
// A group's Gram is staged in shared memory when it fits in the default 48 KB (K <= 78).
constexpr int64_t kMaxSharedGramBytes = 48 * 1024;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// One thread's array inside the interleaved scratch: element i at base[i * stride].
template <typename T>
struct Strided {
  T* base;
  int64_t stride;
  C10_HOST_DEVICE T& operator[](int64_t i) const { return base[i * stride]; }
};

// One signal's working memory (omp_pursuit.h's Pursuit) in the scratch buffers (carve_scratch).
using SignalScratch = omp_detail::Pursuit<Strided<double>, Strided<int64_t>>;

// Doubles and int64s of scratch per thread (see SignalScratch).
constexpr int64_t scratch_doubles(int64_t K, int64_t s) { return K + s * s + 3 * s; }
constexpr int64_t scratch_longs(int64_t K, int64_t s) { return s + 2 * K; }

// One signal's Pursuit arrays carved out of scratch starting at d and l, element i of each array
// at i * stride: the thread path interleaves its threads (stride = threads, so a warp's reads are
// coalesced), the warp path gives each signal its own run (stride 1: the lanes read consecutive
// entries). One layout and one type for both paths, so omp_pursuit.h's steps are compiled once
// for CUDA and the two paths cannot round differently.
__device__ __forceinline__ SignalScratch carve_scratch(double* d, int64_t* l, int64_t K, int64_t s,
                                                       int64_t stride) {
  return SignalScratch{
      {d, stride},
      {d + K * stride, stride},
      {d + (K + s * s) * stride, stride},
      {d + (K + s * s + s) * stride, stride},
      {d + (K + s * s + 2 * s) * stride, stride},
      {l, stride},
      {l + s * stride, stride},
      {l + (s + K) * stride, stride},
  };
}

// OMP of one signal from its correlations xy (K floats) and the group's Gram (K x K doubles,
// global or shared memory); writes s indices and coefficients. The correlation update is a fused
// multiply-add, as in the CPU's AVX2 kernel; the steps after the argmax are omp_pursuit.h's.
__device__ void omp_one(const float* __restrict__ xy, const double* gram, int64_t K, int64_t s,
                        const SignalScratch& sc, int64_t* __restrict__ indices,
                        float* __restrict__ coefs) {
  int64_t n = 0;
  while (n < s) {
    // alpha = Xy - Gram[:, S] gamma (Gram is symmetric: a sum of rows), and its largest |value|.
    double m = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      double a = xy[i];
      for (int64_t t = 0; t < n; ++t) a = fma(-sc.gamma[t], gram[sc.support[t] * K + i], a);
      sc.alpha[i] = a;
      m = fmax(m, fabs(a));  // a NaN is skipped; if all are NaN no atom matches m below
    }
    int64_t lam = -1, count = 0;
    for (int64_t i = 0; i < K; ++i)
      if (fabs(sc.alpha[i]) == m) {
        if (lam < 0) lam = i;
        ++count;
      }
    if (lam < 0) break;  // no atom compares equal to m (non-finite input)
    if (count > 1) lam = omp_detail::first_in_sklearn_order(sc, n, K, m);
    if (!omp_detail::add_atom(sc, xy, gram, K, s, lam, m, n)) break;
  }
  omp_detail::write_codes(sc, n, s, indices, coefs);
}

// The Gram matrix a block reads for one group: staged into shared memory when it fits
// (shared_gram), else the global one. Called by every thread of the block (it synchronises).
__device__ __forceinline__ const double* group_gram(const double* gram, int64_t K, bool shared_gram,
                                                    double* staged) {
  if (!shared_gram) return gram;
  __syncthreads();  // every thread is done with the previous group's Gram
  for (int64_t e = threadIdx.x; e < K * K; e += blockDim.x) staged[e] = gram[e];
  __syncthreads();
  return staged;
}

// OMP of the signals of one Xy tile: groups g0 .. g0 + gn - 1, signals m0 .. m0 + mn - 1 of each.
//   xy (gn, mn, K) contiguous float32; gram (G, K, K) contiguous float64;
//   indices / coefs (G, M, s) contiguous; dscratch / lscratch: scratch_doubles / scratch_longs
//   entries for each of the gridDim.x * gridDim.y * blockDim.x threads, interleaved.
// Blocks stride over groups along y and over signal chunks along x; every thread of a block takes
// part in each group's __syncthreads (the group loop depends on blockIdx only).
__global__ void __launch_bounds__(kMaxThreads)
    omp_kernel(const float* __restrict__ xy, const double* __restrict__ gram_all, bool shared_gram,
               int64_t g0, int64_t gn, int64_t m0, int64_t mn, int64_t M, int64_t K, int64_t s,
               double* __restrict__ dscratch, int64_t* __restrict__ lscratch,
               int64_t* __restrict__ indices, float* __restrict__ coefs) {
  extern __shared__ double staged_gram[];
  const int64_t threads = static_cast<int64_t>(gridDim.x) * gridDim.y * blockDim.x;
  const int64_t me =
      (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  const SignalScratch sc = carve_scratch(dscratch + me, lscratch + me, K, s, threads);
  const int64_t signal_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t gl = blockIdx.y; gl < gn; gl += gridDim.y) {
    const int64_t g = g0 + gl;
    const double* gram = group_gram(gram_all + g * K * K, K, shared_gram, staged_gram);
    for (int64_t ml = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; ml < mn;
         ml += signal_stride) {
      const int64_t out = (g * M + m0 + ml) * s;
      omp_one(xy + (gl * mn + ml) * K, gram, K, s, sc, indices + out, coefs + out);
    }
  }
}

// omp_one for a whole warp: lanes split the K atoms for the correlation update and the argmax;
// lane 0 runs the tie order and the support update; the support, gamma and n every lane needs
// next are read after __syncwarp (global memory written by lane 0) and a broadcast.
__device__ void omp_one_warp(const float* __restrict__ xy, const double* gram, int64_t K, int64_t s,
                             const SignalScratch& sc, int64_t* __restrict__ indices,
                             float* __restrict__ coefs, int lane) {
  int64_t n = 0;
  while (n < s) {
    double m = 0.0;
    int64_t first = K;  // this lane's first atom at the running maximum
    for (int64_t i = lane; i < K; i += kWarp) {
      double a = xy[i];
      for (int64_t t = 0; t < n; ++t) a = fma(-sc.gamma[t], gram[sc.support[t] * K + i], a);
      sc.alpha[i] = a;
      m = fmax(m, fabs(a));  // as the thread path: a NaN is skipped
    }
    m = fmax(m, __shfl_xor_sync(kFullMask, m, 16));  // the exact maximum, whatever the order
    m = fmax(m, __shfl_xor_sync(kFullMask, m, 8));
    m = fmax(m, __shfl_xor_sync(kFullMask, m, 4));
    m = fmax(m, __shfl_xor_sync(kFullMask, m, 2));
    m = fmax(m, __shfl_xor_sync(kFullMask, m, 1));
    int count = 0;
    for (int64_t i = lane; i < K; i += kWarp)
      if (fabs(sc.alpha[i]) == m) {
        if (first == K) first = i;
        ++count;
      }
    for (int off = kWarp / 2; off > 0; off /= 2) {
      first = std::min<int64_t>(first, __shfl_xor_sync(kFullMask, first, off));
      count += __shfl_xor_sync(kFullMask, count, off);
    }
    if (first == K) break;  // no atom compares equal to m (non-finite input): warp-uniform
    __syncwarp();           // every lane's alpha is written before lane 0 may read them all
    int added = 0;
    if (lane == 0) {
      const int64_t lam = count > 1 ? omp_detail::first_in_sklearn_order(sc, n, K, m) : first;
      added = omp_detail::add_atom(sc, xy, gram, K, s, lam, m, n) ? 1 : 0;
    }
    added = __shfl_sync(kFullMask, added, 0);
    n = __shfl_sync(kFullMask, n, 0);
    __syncwarp();  // lane 0's support and gamma are visible to the lanes that read them next
    if (!added) break;
  }
  if (lane == 0) omp_detail::write_codes(sc, n, s, indices, coefs);
}

// The warp path over one Xy tile (arguments as omp_kernel's). Warps stride over signals along x
// and blocks over groups along y; dscratch / lscratch hold scratch_doubles / scratch_longs
// entries for each of the gridDim.x * gridDim.y * kWarpsPerOmpBlock warps, one after another.
__global__ void __launch_bounds__(kMaxThreads)
    omp_warp_kernel(const float* __restrict__ xy, const double* __restrict__ gram_all,
                    bool shared_gram, int64_t g0, int64_t gn, int64_t m0, int64_t mn, int64_t M,
                    int64_t K, int64_t s, double* __restrict__ dscratch,
                    int64_t* __restrict__ lscratch, int64_t* __restrict__ indices,
                    float* __restrict__ coefs) {
  extern __shared__ double staged_gram[];
  const int lane = threadIdx.x % kWarp;
  const int64_t warp_in_block = threadIdx.x / kWarp;
  const int64_t me =
      (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kWarpsPerOmpBlock +
      warp_in_block;
  const SignalScratch sc = carve_scratch(dscratch + me * scratch_doubles(K, s),
                                         lscratch + me * scratch_longs(K, s), K, s, 1);
  const int64_t signal_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerOmpBlock;
  for (int64_t gl = blockIdx.y; gl < gn; gl += gridDim.y) {
    const int64_t g = g0 + gl;
    const double* gram = group_gram(gram_all + g * K * K, K, shared_gram, staged_gram);
    // The loop count depends on the warp only, so every lane takes part in the shuffles.
    for (int64_t ml = static_cast<int64_t>(blockIdx.x) * kWarpsPerOmpBlock + warp_in_block; ml < mn;
         ml += signal_stride) {
      const int64_t out = (g * M + m0 + ml) * s;
      omp_one_warp(xy + (gl * mn + ml) * K, gram, K, s, sc, indices + out, coefs + out, lane);
    }
  }
}

// Whether this call takes the warp path: FASTAD_OMP_CUDA_PATH=warp (thread: the default).
bool use_warp_path() { return env_choice("FASTAD_OMP_CUDA_PATH", {"warp", "thread"}) == 0; }

// Refuses dictionaries whose atoms are not of unit norm, from the Gram diagonals (float64), with
// the CPU's message (check_unit_atom, omp.h). The verdict is computed on the device; reading
// it is the op's one host sync.
void check_unit_atoms(const at::Tensor& gram) {
  const int64_t groups = gram.size(0), K = gram.size(1);
  const at::Tensor norms = at::diagonal(gram, 0, 1, 2).sqrt().reshape({-1});  // (G * K), g-major
  const at::Tensor ok = (norms - 1.0).abs() <= kAtomNormTolerance;            // NaN is not ok
  const at::Tensor position = at::arange(groups * K, norms.options().dtype(at::kLong));
  const int64_t first_bad = at::where(ok, groups * K, position).min().item<int64_t>();
  if (first_bad == groups * K) return;
  const double norm = norms[first_bad].item<double>();  // error path only
  check_unit_atom(norm, first_bad % K, first_bad / K);  // fails: the message of the CPU's check
}

// Launch shape for a tile of gn groups of mn signals, per_block signals to a block, within the
// budget of max_units signals in flight (threads or warps).
dim3 grid_for(int64_t gn, int64_t mn, int64_t per_block, int64_t max_units) {
  const int64_t max_blocks = std::max<int64_t>(1, max_units / per_block);
  const int64_t gy = std::min({gn, kMaxGridY, max_blocks});
  const int64_t gx = std::min(
      {(mn + per_block - 1) / per_block, std::max<int64_t>(1, max_blocks / gy), kMaxGridX});
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> omp_cuda(const at::Tensor& x, const at::Tensor& dictionary,
                                            int64_t n_nonzero) {
  check_omp_args(x, dictionary, n_nonzero);
  TORCH_CHECK(x.is_cuda(), "omp_cuda expects CUDA tensors, got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t groups = x.size(0), M = x.size(1), K = dictionary.size(1), s = n_nonzero;
  at::Tensor indices = at::empty({groups, M, s}, x.options().dtype(at::kLong));
  at::Tensor coefs = at::empty({groups, M, s}, x.options());
  if (groups == 0) return {indices, coefs};
  // Contiguous operands (as the tiles of x below): the GEMMs, hence the results, do not depend on
  // the inputs' strides.
  const at::Tensor atoms = dictionary.contiguous();
  const at::Tensor dict64 = atoms.to(at::kDouble);
  const at::Tensor gram = at::matmul(dict64, dict64.mT()).contiguous();  // (G, K, K)
  check_unit_atoms(gram);
  if (M == 0) return {indices, coefs};
  const at::Tensor atoms_t = atoms.mT();  // (G, d, K)

  // Tiles of Xy as on the CPU: whole groups when a group's (M, K) is small, else blocks of one
  // group's signals.
  const int64_t group_floats = M * K;
  const int64_t groups_per_tile = std::max<int64_t>(1, kXyTileFloats / group_floats);
  const int64_t signals_per_tile =
      groups_per_tile > 1 ? M : std::max<int64_t>(1, kXyTileFloats / K);
  // A unit of work is a signal: a thread's on the thread path, a warp's on the warp path.
  // per_block: signals a block runs at once; threads: the block's threads.
  const bool warp_path = use_warp_path();
  const int64_t threads =
      warp_path ? kMaxThreads
                : std::min<int64_t>(kMaxThreads, (std::min(M, signals_per_tile) + 31) / 32 * 32);
  const int64_t per_block = warp_path ? kWarpsPerOmpBlock : threads;
  const int64_t unit_bytes = 8 * (scratch_doubles(K, s) + scratch_longs(K, s));
  // The warp path keeps up to 4 times the thread path's threads in flight (a warp per signal).
  const int64_t unit_cap = warp_path ? kMaxTotalThreads / 8 : kMaxTotalThreads;
  const int64_t max_units =
      std::min(unit_cap, std::max<int64_t>(per_block, kScratchBytes / unit_bytes));
  // Every tile's grid has gy <= its groups, gx <= its signal chunks and gx * gy <= max_units /
  // per_block (grid_for), so this many units' scratch serves every launch.
  const int64_t most_blocks =
      std::min(std::max<int64_t>(1, max_units / per_block),
               std::min(groups_per_tile, groups) *
                   ((std::min(signals_per_tile, M) + per_block - 1) / per_block));
  const int64_t scratch_units = most_blocks * per_block;
  at::Tensor dscratch = at::empty({scratch_units * scratch_doubles(K, s)}, gram.options());
  at::Tensor lscratch = at::empty({scratch_units * scratch_longs(K, s)}, indices.options());

  const bool shared_gram = K * K * 8 <= kMaxSharedGramBytes;
  const size_t shared_bytes = shared_gram ? static_cast<size_t>(K * K * 8) : 0;
  const double* gp = gram.const_data_ptr<double>();
  int64_t* ip = indices.mutable_data_ptr<int64_t>();
  float* cp = coefs.mutable_data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t g0 = 0; g0 < groups; g0 += groups_per_tile) {
    const int64_t gn = std::min(groups_per_tile, groups - g0);
    for (int64_t m0 = 0; m0 < M; m0 += signals_per_tile) {
      const int64_t mn = std::min(signals_per_tile, M - m0);
      const at::Tensor xy =  // (gn, mn, K): every signal's correlations with its group's atoms
          at::matmul(x.narrow(0, g0, gn).narrow(1, m0, mn).contiguous(), atoms_t.narrow(0, g0, gn))
              .contiguous();
      const dim3 grid = grid_for(gn, mn, per_block, max_units);
      TORCH_INTERNAL_ASSERT(static_cast<int64_t>(grid.x) * grid.y * per_block <= scratch_units);
      const auto launch = warp_path ? omp_warp_kernel : omp_kernel;
      launch<<<grid, static_cast<unsigned>(threads), shared_bytes, stream>>>(
          xy.const_data_ptr<float>(), gp, shared_gram, g0, gn, m0, mn, M, K, s,
          dscratch.mutable_data_ptr<double>(), lscratch.mutable_data_ptr<int64_t>(), ip, cp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {indices, coefs};
}

TORCH_LIBRARY_IMPL(fastad, CUDA, m) { m.impl("omp", &omp_cuda); }

}  // namespace fastad
