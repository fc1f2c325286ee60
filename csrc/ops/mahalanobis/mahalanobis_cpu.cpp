// CPU squared Mahalanobis distances: per position, the centred values of a chunk of samples
// times the lower triangle of that position's factor, squared and summed.
//
// Why this shape: out[r] = ||c_r L||^2 over the samples c_r of a chunk is a small triangular
// matrix product, (n x D) by (D x D lower), so the kernels are register-blocked like a GEMM
// micro-kernel, in one of two layouts (mahalanobis_cpu_kernels.h):
//  * samples in lanes (17 samples or more; AVX-512, AVX2): a tile is centred into [feature][sample]
//    order; the kernel multiplies vectors of 16 samples by single factor entries, 2 vectors x 8
//    columns at a time, over the rows i >= j of those columns. Entries are broadcast one by one,
//    so the factor is read where it lies, row-major or column-major (torch.linalg.cholesky's
//    layout), with no packing: packing cost a pass over D^2 / 2 floats per position, about a
//    third of the arithmetic at PaDiM's shape. Only the entries on or below the diagonal are read.
//  * columns (at most 4 samples, AVX-512, a column-major factor): each output column a dot product
//    of the factor's column, contiguous from the diagonal down, with the sample, so the factor is
//    read where it lies and only once; a batch of 1 (inline inspection) no longer packs it.
//  * samples in rows (fewer samples, or no AVX-512): the factor's lower triangle is first packed
//    into panels of W = vector-width columns, zeros right of the diagonal; the kernel broadcasts
//    one centred value per sample and multiplies it by W factor entries. Packing is done once per
//    position and chunk of samples (once per thread for a shared factor).
//
// Work is split over tiles of (consecutive positions) x (a chunk of samples) with
// at::parallel_for; a thread centres a tile's rows once into its own buffer (never a (B, P, D)
// tensor), reading x through its strides:
//  * features contiguous ((B, P, D) memory, channels-last CNN features): one position per tile,
//    each row read directly;
//  * positions contiguous (a channels-first CNN's (B, D, P) memory seen as (B, P, D)): up to 64
//    positions per tile, so that each feature of a sample is one contiguous run of x, turned into
//    rows 16 x 16 at a time through registers (AVX-512). Read one position at a time, such x
//    costs a new page per feature: 46 ms instead of 15 at PaDiM's shape (B 32, P 3136, D 100).
// With one factor per position the op streams P factors from memory, so the next position's
// factor triangle and the next tile's part of x are prefetched while a tile computes.
// The instruction set (AVX-512, AVX2 or portable) is chosen per call (fastad/cpu_isa.h); the
// variable FASTAD_MAHALANOBIS_CPU_ISA forces a lesser one.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "fastad/cpu_isa.h"
#include "mahalanobis.h"
#include "mahalanobis_cpu_kernels.h"

namespace fastad {
namespace {

using mahalanobis_kernels::FactorView;
using mahalanobis_kernels::Kernels;

// Samples per tile.
constexpr int64_t kChunk = 64;
// Positions per tile when x's features are strided; the tile's centred values stay within
// kBlockFloats floats (1 MB, inside a core's L2 cache).
constexpr int64_t kBlock = 64;
constexpr int64_t kBlockFloats = int64_t{1} << 18;
// Tiles smaller than this many multiply-adds are grouped so a thread's share is worth a fork.
constexpr int64_t kMinMacsPerTask = int64_t{1} << 17;
// Prefetching the next tile (its factor triangle, D^2 / 2 floats, and its rows of x) pays only
// while that fits in cache next to the current one; larger D is left to the hardware.
constexpr int64_t kPrefetchMaxD = 256;
// The lanes kernel pays from two vectors of samples on; below, the rows kernel wastes no lanes.
constexpr int64_t kLanesMinSamples = 17;
// Up to this many samples at a position, a column-major factor is read in place by the columns
// kernel rather than packed for the rows kernel: the packing pass is what a batch of 1 paid for.
constexpr int64_t kColumnsMaxSamples = 4;

Kernels kernels_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return mahalanobis_kernels::kernels_avx512();
    case CpuIsa::kAvx2:
      return mahalanobis_kernels::kernels_avx2();
    default:
      return mahalanobis_kernels::kernels_portable();
  }
}

// Asks for the cache lines of `floats` floats from `p` on (a hint: never faults, never waits).
inline void prefetch(const float* p, int64_t floats) {
  const char* a = reinterpret_cast<const char*>(p);
  const char* end = reinterpret_cast<const char*>(p + floats);
  for (; a < end; a += 64) __builtin_prefetch(a, 0, 2);
  __builtin_prefetch(end - 1, 0, 2);  // the last line when p is not line-aligned
}

// The lower triangle of a factor, in whichever of the two usual layouts it is.
inline void prefetch_factor(FactorView L, int64_t d) {
  if (L.sj == 1) {
    for (int64_t i = 0; i < d; ++i) prefetch(L.p + i * L.si, i + 1);  // row i up to the diagonal
  } else if (L.si == 1) {
    for (int64_t j = 0; j < d; ++j)
      prefetch(L.p + j * L.sj + j, d - j);  // column j from the diagonal
  }
}

// Scratch floats aligned to a cache line, so that the lanes layout's vectors never split one.
struct AlignedFloats {
  explicit AlignedFloats(int64_t n)
      : data(static_cast<float*>(std::aligned_alloc(
            64, static_cast<size_t>((std::max<int64_t>(n, 1) + 15) / 16 * 64)))) {
    TORCH_CHECK(data != nullptr, "mahalanobis: out of memory for a tile of ", n, " floats");
  }
  ~AlignedFloats() { std::free(data); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data;
};

}  // namespace

at::Tensor mahalanobis_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& L) {
  check_mahalanobis_args(x, mean, L);
  const int64_t b_size = x.size(0), p_size = x.size(1), d = x.size(2);
  at::Tensor out = at::empty({b_size, p_size}, x.options());
  if (b_size == 0 || p_size == 0) return out;
  const Kernels kernels = kernels_for(cpu_isa("FASTAD_MAHALANOBIS_CPU_ISA"));

  // Everything is read through its strides: no argument is copied.
  const float* xp = x.const_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  const float* lp = L.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t sb = x.stride(0), sp = x.stride(1), sd = x.stride(2);
  const bool shared_factor = L.size(0) == 1;
  const int64_t l_step = shared_factor ? 0 : L.stride(0);
  const int64_t l_si = L.stride(1), l_sj = L.stride(2);
  const bool shared_mean = mean.size(0) == 1;
  const int64_t m_step = shared_mean ? 0 : mean.stride(0), m_si = mean.stride(1);
  const bool mean_rows_contiguous = m_si == 1 || d == 1;  // else a tile copies its means first

  // Tiles: `block` consecutive positions x `chunk` samples, block-major.
  // Fewer positions than threads (Gaussian AD scores one pooled vector per image: P = 1): smaller
  // chunks of samples, but whole micro-kernel groups, so that every thread gets a tile.
  int64_t chunk = std::min(b_size, kChunk);
  const int64_t threads = at::get_num_threads();
  if (p_size < threads)
    chunk = std::min(chunk, std::max<int64_t>(16, (b_size + threads - 1) / threads));
  const int64_t chunks = (b_size + chunk - 1) / chunk;
  const bool use_lanes = kernels.lanes_sums != nullptr && chunk >= kLanesMinSamples;
  const bool factor_in_place =
      l_si == 1 || d == 1;  // column-major: the lanes kernel reads it where it lies
  const bool columns_in_place =
      kernels.columns_sums != nullptr && l_si == 1;  // and so does the columns kernel
  const int64_t max_lanes = use_lanes ? (chunk + 15) / 16 * 16 : chunk;
  const bool rows_contiguous = sd == 1 || d == 1;
  const int64_t block = rows_contiguous ? 1
                                        : std::clamp<int64_t>(kBlockFloats / (max_lanes * d), 1,
                                                              std::min(kBlock, p_size));
  const int64_t blocks = (p_size + block - 1) / block;
  const int64_t tile_macs = block * chunk * d * (d + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerTask / std::max<int64_t>(1, tile_macs));
  struct Tile {
    int64_t p0, np, b0, n;  // positions p0 .. p0+np, samples b0 .. b0+n
  };
  const auto tile_at = [&](int64_t t) {
    const int64_t p0 = std::min(t / chunks, blocks - 1) * block, b0 = (t % chunks) * chunk;
    return Tile{p0, std::min(block, p_size - p0), b0, std::min(chunk, b_size - b0)};
  };
  const auto factor_at = [&](int64_t q) { return FactorView{lp + q * l_step, l_si, l_sj}; };
  // The centring that applies to this x, in the chosen layout (nullptr: the scalar loop).
  mahalanobis_kernels::CentreFn centre = nullptr;
  if (use_lanes) {
    centre = sd == 1 ? kernels.lanes_from_rows : sp == 1 ? kernels.lanes_from_runs : nullptr;
  } else if (!rows_contiguous && sp == 1) {
    centre = kernels.rows_from_runs;
  }

  at::parallel_for(0, blocks * chunks, grain, [&](int64_t begin, int64_t end) {
    AlignedFloats centred(block * max_lanes *
                          d);  // rows: [position][sample][i]; lanes: [position][i][sample]
    AlignedFloats packed(use_lanes ? (factor_in_place ? 0 : d * d)
                                   : mahalanobis_kernels::packed_floats(d, kernels.width));
    AlignedFloats scratch(std::max(kChunk * 16, d));
    AlignedFloats tile_means(mean_rows_contiguous ? 0 : block * d);
    float dist[kChunk];
    int64_t ready = -1;  // the factor in `factor`
    const float* factor = nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = tile_at(t), next = tile_at(t + 1);
      const bool has_next = t + 1 < end;  // and it is this thread's
      const int64_t lanes = use_lanes ? (tile.n + 15) / 16 * 16 : tile.n;
      // The tile's means, feature-contiguous: mean itself, or a copy of its rows.
      const float* mt = mp + tile.p0 * m_step;
      int64_t mt_step = m_step;
      if (!mean_rows_contiguous) {
        const int64_t rows = shared_mean ? 1 : tile.np;
        for (int64_t k = 0; k < rows; ++k)
          for (int64_t i = 0; i < d; ++i) tile_means.data[k * d + i] = mt[k * m_step + i * m_si];
        mt = tile_means.data;
        mt_step = shared_mean ? 0 : d;
      }
      const float* xt = xp + tile.b0 * sb + tile.p0 * sp;
      float* c = centred.data;
      if (centre != nullptr) {
        centre(xt, sb, sp, sd, tile.n, tile.np, d, mt, mt_step, c, lanes);
      } else {
        // Scalar: element (k, r, i) of the tile goes to c[(k n + r) d + i] (rows) or
        // c[(k d + i) lanes + r] (lanes); padding lanes are zeroed.
        const int64_t stride_r = use_lanes ? 1 : d, stride_i = use_lanes ? lanes : 1;
        const int64_t stride_k = use_lanes ? d * lanes : tile.n * d;
        for (int64_t k = 0; k < tile.np; ++k)
          for (int64_t r = 0; r < lanes; ++r)
            for (int64_t i = 0; i < d; ++i)
              c[k * stride_k + r * stride_r + i * stride_i] =
                  r < tile.n ? xt[r * sb + k * sp + i * sd] - mt[k * mt_step + i] : 0.0f;
      }
      if (has_next && rows_contiguous && sd == 1 &&
          d <= kPrefetchMaxD)  // the next tile's rows (one position)
        for (int64_t r = 0; r < next.n; ++r) prefetch(xp + (next.b0 + r) * sb + next.p0 * sp, d);
      // Runs of x are short (np floats), each in its own page: too scattered for the hardware
      // prefetcher, so the next tile's are prefetched here, a share before each position.
      const bool fetch_runs = has_next && !rows_contiguous && sp == 1;
      const int64_t runs = next.n * d;
      for (int64_t k = 0; k < tile.np; ++k) {
        if (fetch_runs)
          for (int64_t u = runs * k / tile.np; u < runs * (k + 1) / tile.np; ++u)
            prefetch(xp + (next.b0 + u / d) * sb + next.p0 + (u % d) * sd, next.np);
        const int64_t p = tile.p0 + k;
        const int64_t q = shared_factor ? 0 : p;
        const int64_t q_next = k + 1 < tile.np ? p + 1 : next.p0;
        if (!shared_factor && d <= kPrefetchMaxD && (k + 1 < tile.np || has_next) && q_next != q)
          prefetch_factor(factor_at(q_next), d);
        if (use_lanes) {
          FactorView columns = factor_at(q);
          if (!factor_in_place) {  // transposed once per position and chunk
            if (q != ready) kernels.to_columns(columns, d, packed.data);
            columns = FactorView{packed.data, 1, d};
          }
          ready = q;
          kernels.lanes_sums(c + k * d * lanes, tile.n, lanes, d, columns, dist);
        } else if (columns_in_place && tile.n <= kColumnsMaxSamples) {
          kernels.columns_sums(c + k * tile.n * d, tile.n, d, factor_at(q), dist);
        } else {
          if (q != ready) {
            factor = kernels.prepare(factor_at(q), d, packed.data);
            ready = q;
          }
          kernels.rows_sums(c + k * tile.n * d, tile.n, d, factor, scratch.data, dist);
        }
        for (int64_t r = 0; r < tile.n; ++r) op[(tile.b0 + r) * p_size + p] = dist[r];
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastad, CPU, m) { m.impl("mahalanobis", &mahalanobis_cpu); }

}  // namespace fastad
