// The pieces the CPU Mahalanobis driver (mahalanobis_cpu.cpp) assembles, one set per instruction
// set: how a factor is made ready (packed), how a tile of samples is centred, and the micro-kernels
// that turn centred values and a ready factor into squared distances.
//
// Two layouts of centred values exist, because two micro-kernels do:
//  * rows:  [position][sample][feature]. The kernel broadcasts one centred value per sample and
//           multiplies it by a vector of W factor columns ("samples in rows"); good for a few
//           samples (B < 17), where lanes spent on samples would stay empty.
//  * lanes: [position][feature][sample], the samples padded to `lanes` = a multiple of 16. The
//           kernel (mahalanobis_cpu_lanes.inc, for any vector width) loads one vector of samples'
//           values of one feature and broadcasts one factor entry per output column ("samples in
//           lanes"): on AVX-512 two vectors of samples by 8 columns make 16 independent FMA chains
//           for 10 loads, where the rows kernel needs 17 loads for 16 FMAs (AVX2: 2 by 6), and no
//           horizontal sums are needed at the end. Broadcasts read single entries, so
//           this kernel reads the factor where it lies, with no packing. Padding lanes hold
//           whatever the centring wrote there and are never output.
#pragma once

#include <cstdint>

namespace fastad::mahalanobis_kernels {

// One factor, read through strides: L[i, j] = p[i * si + j * sj]. Row-major (sj = 1) is what
// `.contiguous()` gives; column-major (si = 1) is what torch.linalg.cholesky returns.
struct FactorView {
  const float* p;
  int64_t si, sj;
};

// Packs a factor's lower triangle (the upper one is never read) into `buffer` and returns it; or
// returns a pointer the sums kernel reads directly.
using PrepareFn = const float* (*)(FactorView L, int64_t d, float* buffer);

// out[r] = ||c_r L||^2 for n centred samples at one position.
//  * Rows layout, from a prepared factor: c holds n rows of d floats; `scratch` holds
//    max(64 x 16, d) floats.
//  * Lanes layout, from a column-major factor (si = 1) read in place; only its lower triangle is
//    read: c holds d rows of `lanes` floats, 64-byte aligned, lanes a multiple of 16.
using RowsSumsFn = void (*)(const float* c, int64_t n, int64_t d, const float* factor,
                            float* scratch, float* out);
using LanesSumsFn = void (*)(const float* c, int64_t n, int64_t lanes, int64_t d, FactorView L,
                             float* out);

// out[r] = ||c_r L||^2 for a few samples (rows layout: n rows of d floats) from a column-major
// factor (si = 1) read in place: each output column is a dot product of the factor's column,
// contiguous from its diagonal down, with the sample's values, so nothing is packed and the factor
// streams through once; 16 columns' partial sums are reduced together through a register
// transpose. For one or a few samples (an inline inspection's batch of 1), where packing the
// factor would cost more than the products.
using ColumnsSumsFn = void (*)(const float* c, int64_t n, int64_t d, FactorView L, float* out);

// Copies a factor's lower triangle column-major into `buffer` (d x d floats; dst[j d + i] for
// i >= j, the rest unset) and returns it: for the lanes kernel, when L is not column-major.
using ToColumnsFn = float* (*)(FactorView L, int64_t d, float* buffer);

// Centring x[r, k, i] - mean[k, i] for r < n samples, k < np positions, i < d features, where
// x[r, k, i] is at x + r sb + k sp + i sd and mean[k, i] at mean + k mean_step + i.
//  * rows from positions-contiguous x (sp = 1): dst[(k n + r) d + i];
//  * lanes from feature-contiguous x (sd = 1): dst[(k d + i) lanes + r];
//  * lanes from positions-contiguous x (sp = 1): dst[(k d + i) lanes + r].
using CentreFn = void (*)(const float* x, int64_t sb, int64_t sp, int64_t sd, int64_t n, int64_t np,
                          int64_t d, const float* mean, int64_t mean_step, float* dst,
                          int64_t lanes);

struct Kernels {
  int64_t width;  // panel width W of the packed layout; 0: the factor is dense row-major (d x d)
  PrepareFn prepare;
  RowsSumsFn rows_sums;
  LanesSumsFn lanes_sums;      // nullptr: no lanes kernel for this set
  ToColumnsFn to_columns;      // nullptr when lanes_sums is
  CentreFn rows_from_runs;     // nullptr: a scalar loop does it
  CentreFn lanes_from_rows;    // nullptr when lanes_sums is
  CentreFn lanes_from_runs;    // nullptr when lanes_sums is
  ColumnsSumsFn columns_sums;  // nullptr: the rows kernel serves few samples on any factor
};

// Floats of the packed layout: panel k holds rows i >= kW of columns kW .. kW+W, W floats each.
inline int64_t packed_floats(int64_t d, int64_t w) {
  if (w == 0) return d * d;
  const int64_t panels = (d + w - 1) / w;
  return w * (panels * d - w * panels * (panels - 1) / 2);
}

// Offset of panel k in the packed layout.
inline int64_t panel_offset(int64_t k, int64_t d, int64_t w) {
  return w * (k * d - w * k * (k - 1) / 2);
}

// Any layout, scalar: the fallback for strides that are neither row- nor column-major. Zeros
// right of the diagonal and past column d.
inline void pack_strided(FactorView L, int64_t d, int64_t w, float* dst) {
  for (int64_t k = 0; k * w < d; ++k) {
    float* panel = dst + panel_offset(k, d, w);
    for (int64_t i = k * w; i < d; ++i)
      for (int64_t l = 0; l < w; ++l) {
        const int64_t j = k * w + l;
        panel[(i - k * w) * w + l] = j <= i ? L.p[i * L.si + j * L.sj] : 0.0f;
      }
  }
}

// Any layout, scalar: column-major copy of the lower triangle.
inline void copy_lower_to_columns(FactorView L, int64_t d, float* dst) {
  for (int64_t j = 0; j < d; ++j)
    for (int64_t i = j; i < d; ++i) dst[j * d + i] = L.p[i * L.si + j * L.sj];
}

Kernels kernels_avx512();
Kernels kernels_avx2();
Kernels kernels_portable();

}  // namespace fastad::mahalanobis_kernels
