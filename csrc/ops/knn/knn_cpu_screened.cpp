// CPU kNN, screened path: a cheap int8 first pass that proves most bank rows cannot be among the
// k nearest, and exact float32 re-ranking of every row it cannot rule out. The result is exact.
//
// Why: on AVX2 (no AVX-512/VNNI) an int8 multiply-add (vpmaddubsw) does 32 products per
// instruction where an FP32 FMA does 8, so the first pass costs about half an FP32 GEMM, and the
// re-ranking touches only a few hundred rows per query.
//
// The bound. Rows are first centred on the bank's mean (distances are unchanged). Each row x is coded as x = s*c + e with a per-row scale s = max|x| / 63, 7-bit codes
// c in [-63, 63] and a residual e. For a query q and a bank row b, with q^ = s_q*c_q and
// b^ = s_b*c_b, Cauchy-Schwarz gives
//     |q.b - q^.b^| <= |e_q| |b^| + |q^| |e_b| + |e_q| |e_b| =: delta
// so ||q - b||^2 >= |q|^2 + |b|^2 - 2 q^.b^ - 2 delta =: LB, where q^.b^ = s_q s_b (c_q . c_b) is
// computed exactly in integers. A bank row whose LB exceeds the k-th best exact distance found so
// far cannot enter the result. A relative slack of kSlack on |q|^2 + |b|^2 covers float32 rounding.
//
// The integer product. vpmaddubsw multiplies unsigned by signed bytes, so query codes are stored
// as c_q + 64 in [1, 127] and the offset is removed with the per-row code sums of the bank:
// c_q . c_b = sum (c_q + 64) c_b - 64 sum c_b. With |c| <= 63 no int16 pair sum saturates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fastad/topk.h"
#include "knn_cpu_internal.h"

namespace fastad {
namespace knn_detail {
namespace {

constexpr int kCodeMax = 63;
constexpr int kQueryOffset = 64;
constexpr int kGroup = 4;               // dims per broadcast int32 of query codes
constexpr int kPanel = 8;               // bank columns per packed panel (one register of int32)
constexpr int kTileCols = 2 * kPanel;   // columns per micro-tile
constexpr int kTileRows = 4;            // query rows per micro-tile
constexpr int64_t kQueryBlock = 64;     // query rows per task
constexpr int64_t kBankChunk = 512;     // bank columns per chunk: its int8 panels stay in L2
constexpr float kSlack = 1e-5f;

struct RowCodes {
  std::vector<float> scale, norm2, hat_norm, err_norm;
  std::vector<int32_t> code_sum;
};

// Codes every row of x - center and records the facts the bound needs. Work is in double so
// that centring loses nothing: the bound must hold for the float inputs taken as exact values.
// `store(r, j, code)` writes code j of row r wherever the caller's layout wants it. Returns false
// if any value is not finite.
template <typename Store>
bool code_rows(const float* x, int64_t rows, int64_t d, const double* center, RowCodes& out,
               Store store) {
  out.scale.resize(rows);
  out.norm2.resize(rows);
  out.hat_norm.resize(rows);
  out.err_norm.resize(rows);
  out.code_sum.resize(rows);
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> v(d);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * d;
      double amax = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        v[j] = static_cast<double>(row[j]) - center[j];
        amax = std::max(amax, std::fabs(v[j]));
      }
      if (!(amax <= DBL_MAX)) {  // inf or NaN somewhere in the row
        finite.store(false, std::memory_order_relaxed);
        continue;
      }
      const float scale = amax > 0.0 ? static_cast<float>(amax / kCodeMax) : 1.0f;
      double n2 = 0.0, h2 = 0.0, e2 = 0.0;
      int32_t sum = 0;
      for (int64_t j = 0; j < d; ++j) {
        int c = static_cast<int>(std::nearbyint(v[j] / scale));
        c = std::clamp(c, -kCodeMax, kCodeMax);
        const double hat = static_cast<double>(scale) * c;
        n2 += v[j] * v[j];
        h2 += hat * hat;
        e2 += (v[j] - hat) * (v[j] - hat);
        sum += c;
        store(r, j, c);
      }
      if (!(n2 <= DBL_MAX)) finite.store(false, std::memory_order_relaxed);
      out.scale[r] = scale;
      // Round the bound's ingredients in the safe direction so float storage never shrinks it.
      out.norm2[r] = static_cast<float>(n2);
      out.hat_norm[r] = static_cast<float>(std::sqrt(h2) * (1.0 + 1e-6));
      out.err_norm[r] = static_cast<float>(std::sqrt(e2) * (1.0 + 1e-6));
      out.code_sum[r] = sum;
    }
  });
  return finite.load();
}

// Mean of the bank rows in double. Distances do not change when both sides are centred, but the
// bound does: it scales with the norms, and features far from the origin (post-ReLU CNN
// activations, a cluster around one point) have norms much larger than their distances.
std::vector<double> column_means(const float* x, int64_t rows, int64_t d) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 256));
  std::vector<std::vector<double>> partial(blocks, std::vector<double>(d, 0.0));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = rows * blk / blocks, r1 = rows * (blk + 1) / blocks;
      double* acc = partial[blk].data();
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < d; ++j) acc[j] += x[r * d + j];
    }
  });
  std::vector<double> mean(d, 0.0);
  for (const auto& p : partial)
    for (int64_t j = 0; j < d; ++j) mean[j] += p[j];
  for (auto& v : mean) v /= static_cast<double>(rows);
  // A NaN mean would hide nothing (code_rows reports the non-finite row) but keep it tidy.
  for (auto& v : mean)
    if (!std::isfinite(v)) v = 0.0;
  return mean;
}

// Everything the tasks read; built once per call.
struct Screen {
  const float* q;
  const float* b;
  int64_t m, n, d, k;
  int64_t dp;      // d rounded up to kGroup
  int64_t groups;  // dp / kGroup
  int64_t np;      // n rounded up to kTileCols
  std::vector<uint8_t> qcodes;  // (m, dp) row-major, code + 64, zero padding
  std::vector<int8_t> bpacked;  // (np / kPanel) panels of (groups, kPanel, kGroup)
  // Per bank column (length np; padding columns have P = NaN so they never pass):
  std::vector<float> P, S, T, U, V;
  // Per query row:
  std::vector<float> A, W, X, Y, Z;
};

// Lower bound LB = A + P + (S*W)*acc + T*X + U*Y + V*Z, with per-row and per-column terms:
//   A = |q|^2 (1 - slack)        P = |b|^2 (1 - slack)
//   W = -2 s_q                   S = s_b                 (times acc = sum (c_q + 64) c_b)
//   X = 128 s_q                  T = s_b sum c_b
//   Y = -2 |e_q|                 U = |b^| + |e_b|
//   Z = -2 |q^|                  V = |e_b|
bool build_screen(Screen& s) {
  s.dp = (s.d + kGroup - 1) / kGroup * kGroup;
  s.groups = s.dp / kGroup;
  s.np = (s.n + kTileCols - 1) / kTileCols * kTileCols;
  s.qcodes.assign(static_cast<size_t>(s.m * s.dp), 0);
  s.bpacked.assign(static_cast<size_t>(s.np * s.dp), 0);

  const std::vector<double> center = column_means(s.b, s.n, s.d);
  RowCodes qc, bc;
  const int64_t dp = s.dp, panel_bytes = s.groups * kPanel * kGroup;
  uint8_t* qcodes = s.qcodes.data();
  int8_t* packed = s.bpacked.data();
  if (!code_rows(s.q, s.m, s.d, center.data(), qc, [&](int64_t r, int64_t j, int c) {
        qcodes[r * dp + j] = static_cast<uint8_t>(c + kQueryOffset);
      }))
    return false;
  if (!code_rows(s.b, s.n, s.d, center.data(), bc, [&](int64_t r, int64_t j, int c) {
        packed[(r / kPanel) * panel_bytes + (j / kGroup) * (kPanel * kGroup) +
               (r % kPanel) * kGroup + (j % kGroup)] = static_cast<int8_t>(c);
      }))
    return false;

  const float nan = std::numeric_limits<float>::quiet_NaN();
  s.P.assign(s.np, nan);
  s.S.assign(s.np, 0.0f);
  s.T.assign(s.np, 0.0f);
  s.U.assign(s.np, 0.0f);
  s.V.assign(s.np, 0.0f);
  for (int64_t j = 0; j < s.n; ++j) {
    s.P[j] = bc.norm2[j] * (1.0f - kSlack);
    s.S[j] = bc.scale[j];
    s.T[j] = bc.scale[j] * static_cast<float>(bc.code_sum[j]);
    s.U[j] = bc.hat_norm[j] + bc.err_norm[j];
    s.V[j] = bc.err_norm[j];
  }
  s.A.resize(s.m);
  s.W.resize(s.m);
  s.X.resize(s.m);
  s.Y.resize(s.m);
  s.Z.resize(s.m);
  for (int64_t r = 0; r < s.m; ++r) {
    s.A[r] = qc.norm2[r] * (1.0f - kSlack);
    s.W[r] = -2.0f * qc.scale[r];
    s.X[r] = 2.0f * kQueryOffset * qc.scale[r];
    s.Y[r] = -2.0f * qc.err_norm[r];
    s.Z[r] = -2.0f * qc.hat_norm[r];
  }
  return true;
}

// One task: query rows [r0, r1) against bank columns [c_begin, c_end) (multiples of kTileCols,
// c_end <= np). Leaves each row's k best (exact squared distances, unsorted) in dist/idx, which
// point at the task's row r0.
__attribute__((target("avx2,fma"))) void screen_task(const Screen& s, int64_t r0, int64_t r1,
                                                      int64_t c_begin, int64_t c_end,
                                                      float* dist, int64_t* idx) {
  const int64_t rows = r1 - r0, k = s.k, d = s.d, groups = s.groups;
  const int64_t panel_bytes = groups * kPanel * kGroup;
  CandidateRows cands(s.q, s.b, d, k, r0, rows, dist, idx);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kBankChunk) {
    const int64_t c1 = std::min(c0 + kBankChunk, c_end);
    for (int64_t rg = 0; rg < rows; rg += kTileRows) {
      const int nvalid = static_cast<int>(std::min<int64_t>(kTileRows, rows - rg));
      const uint8_t* a[kTileRows];
      for (int i = 0; i < kTileRows; ++i)
        a[i] = s.qcodes.data() + (r0 + rg + std::min(i, nvalid - 1)) * s.dp;

      for (int64_t t0 = c0; t0 < c1; t0 += kTileCols) {
        const int8_t* p0 = s.bpacked.data() + (t0 / kPanel) * panel_bytes;
        const int8_t* p1 = p0 + panel_bytes;
        __m256i acc00 = _mm256_setzero_si256(), acc01 = _mm256_setzero_si256();
        __m256i acc10 = _mm256_setzero_si256(), acc11 = _mm256_setzero_si256();
        __m256i acc20 = _mm256_setzero_si256(), acc21 = _mm256_setzero_si256();
        __m256i acc30 = _mm256_setzero_si256(), acc31 = _mm256_setzero_si256();
        for (int64_t g = 0; g < groups; ++g) {
          const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + g * 32));
          const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + g * 32));
          int32_t w;
#define FASTAD_ROW(i)                                                                     \
  std::memcpy(&w, a[i] + g * kGroup, 4);                                                  \
  {                                                                                       \
    const __m256i av = _mm256_set1_epi32(w);                                              \
    acc##i##0 = _mm256_add_epi32(acc##i##0, _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones)); \
    acc##i##1 = _mm256_add_epi32(acc##i##1, _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones)); \
  }
          FASTAD_ROW(0)
          FASTAD_ROW(1)
          FASTAD_ROW(2)
          FASTAD_ROW(3)
#undef FASTAD_ROW
        }
        const __m256i accs[kTileRows][2] = {{acc00, acc01}, {acc10, acc11}, {acc20, acc21}, {acc30, acc31}};
        const __m256 P0 = _mm256_loadu_ps(&s.P[t0]), P1 = _mm256_loadu_ps(&s.P[t0 + 8]);
        const __m256 S0 = _mm256_loadu_ps(&s.S[t0]), S1 = _mm256_loadu_ps(&s.S[t0 + 8]);
        const __m256 T0 = _mm256_loadu_ps(&s.T[t0]), T1 = _mm256_loadu_ps(&s.T[t0 + 8]);
        const __m256 U0 = _mm256_loadu_ps(&s.U[t0]), U1 = _mm256_loadu_ps(&s.U[t0 + 8]);
        const __m256 V0 = _mm256_loadu_ps(&s.V[t0]), V1 = _mm256_loadu_ps(&s.V[t0 + 8]);
        for (int i = 0; i < nvalid; ++i) {
          const int64_t r = rg + i, gr = r0 + r;
          const __m256 A = _mm256_set1_ps(s.A[gr]), W = _mm256_set1_ps(s.W[gr]);
          const __m256 X = _mm256_set1_ps(s.X[gr]), Y = _mm256_set1_ps(s.Y[gr]);
          const __m256 Z = _mm256_set1_ps(s.Z[gr]), th = _mm256_set1_ps(cands.threshold(r));
          __m256 lb0 = _mm256_add_ps(A, P0), lb1 = _mm256_add_ps(A, P1);
          lb0 = _mm256_fmadd_ps(_mm256_mul_ps(S0, W), _mm256_cvtepi32_ps(accs[i][0]), lb0);
          lb1 = _mm256_fmadd_ps(_mm256_mul_ps(S1, W), _mm256_cvtepi32_ps(accs[i][1]), lb1);
          lb0 = _mm256_fmadd_ps(T0, X, lb0);
          lb1 = _mm256_fmadd_ps(T1, X, lb1);
          lb0 = _mm256_fmadd_ps(U0, Y, lb0);
          lb1 = _mm256_fmadd_ps(U1, Y, lb1);
          lb0 = _mm256_fmadd_ps(V0, Z, lb0);
          lb1 = _mm256_fmadd_ps(V1, Z, lb1);
          unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(lb0, th, _CMP_LE_OQ))) |
                          (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(lb1, th, _CMP_LE_OQ))) << 8);
          while (mask) {
            const int bit = __builtin_ctz(mask);
            mask &= mask - 1;
            cands.add(r, t0 + bit);
          }
        }
      }
    }
    // Re-rank while this chunk's float rows are still in cache, and tighten the thresholds.
    cands.rerank_all();
  }
}

}  // namespace

bool knn_screened_int8(const float* q, int64_t m, const float* b, int64_t n, int64_t d, int64_t k,
                       float* dist, int64_t* idx) {
  // Screening pays when the int8 pass dominates and a small share of rows survive it.
  if (!cpu_has_avx2_fma() || d < 32 || n < 1024 || k * 32 > n || k > 1024) return false;
  Screen s;
  s.q = q;
  s.b = b;
  s.m = m;
  s.n = n;
  s.d = d;
  s.k = k;
  if (!build_screen(s)) return false;

  // Tasks: blocks of query rows; when there are fewer blocks than threads (small batches, the
  // inline-inspection case), the bank is split too and the partial results merged.
  const int64_t row_blocks = (m + kQueryBlock - 1) / kQueryBlock;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = (s.np + kBankChunk - 1) / kBankChunk;
  const int64_t splits = std::clamp<int64_t>((threads + row_blocks - 1) / row_blocks, 1, chunks);
  const int64_t chunks_per_split = (chunks + splits - 1) / splits;

  std::vector<float> part_d;
  std::vector<int64_t> part_i;
  if (splits > 1) {
    part_d.resize(static_cast<size_t>(splits * m * k));
    part_i.resize(static_cast<size_t>(splits * m * k));
  }
  at::parallel_for(0, row_blocks * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t / splits, sp = t % splits;
      const int64_t r0 = rb * kQueryBlock, r1 = std::min(m, r0 + kQueryBlock);
      const int64_t c0 = sp * chunks_per_split * kBankChunk;
      const int64_t c1 = std::min(s.np, c0 + chunks_per_split * kBankChunk);
      float* dd = splits > 1 ? part_d.data() + (sp * m + r0) * k : dist + r0 * k;
      int64_t* ii = splits > 1 ? part_i.data() + (sp * m + r0) * k : idx + r0 * k;
      if (c0 < c1) {
        screen_task(s, r0, r1, c0, c1, dd, ii);
      } else {
        for (int64_t r = r0; r < r1; ++r) TopKHeap{dd + (r - r0) * k, ii + (r - r0) * k, k}.reset();
      }
    }
  });
  if (splits > 1) {
    for (int64_t r = 0; r < m; ++r) {
      TopKHeap heap{dist + r * k, idx + r * k, k};
      heap.reset();
      for (int64_t sp = 0; sp < splits; ++sp)
        for (int64_t j = 0; j < k; ++j)
          heap.push(part_d[(sp * m + r) * k + j], part_i[(sp * m + r) * k + j]);
    }
  }
  return true;
}

}  // namespace knn_detail
}  // namespace fastad
