// CPU kNN, screened path: a cheap int8 first pass that proves most bank rows cannot be among the
// k nearest, and exact float32 re-ranking of every row it cannot rule out. The result is exact.
//
// Why: on AVX2 an int8 multiply-add pair (vpmaddubsw + vpmaddwd) does 32 products where an FP32
// FMA does 8, and with AVX-512 VNNI one vpdpbusd does 64 where an FP32 FMA does 16, so the first
// pass costs a fraction of an FP32 GEMM; the re-ranking touches only a few hundred rows per query.
// There are two micro-kernels, AVX2 (8-column panels) and AVX-512 VNNI (16-column panels), chosen
// at run time; everything else (coding, bound, candidates) is shared.
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

#include "fastad/cpu_isa.h"
#include "fastad/topk.h"
#include "knn_cpu_internal.h"

namespace fastad {
namespace knn_detail {
namespace {

constexpr int kCodeMax = 63;
constexpr int kQueryOffset = 64;
constexpr int kGroup = 4;  // dims per broadcast int32 of query codes
// Bank columns per packed panel: one register of int32 accumulators. A micro-tile is two panels
// wide and kTileRows* query rows high.
constexpr int kPanelAvx2 = 8;
constexpr int kPanelVnni = 16;
constexpr int kTileRowsAvx2 = 4;  // 8 accumulators + 2 panels + 1 broadcast of 16 ymm registers
constexpr int kTileRowsVnni = 8;  // 16 accumulators + 2 panels + 1 broadcast of 32 zmm registers
constexpr int kMaxTileCols = 2 * kPanelVnni;
constexpr int64_t kQueryBlock = 64;     // query rows per task
constexpr int64_t kBankChunk = 512;     // bank columns per chunk: its int8 panels stay in L2
constexpr float kSlack = 1e-5f;
constexpr int64_t kMinQueries = 64;

struct RowCodes {
  std::vector<float> scale, norm2, hat_norm, err_norm;
  std::vector<int32_t> code_sum;
};

// What the bound needs to know of one coded row.
struct RowFacts {
  float scale, norm2, hat_norm, err_norm;
  int32_t code_sum;
  bool finite;
};

__attribute__((target("avx2"))) double hsum(__m256d a) {
  double t[4];
  _mm256_storeu_pd(t, a);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// Codes one row x - center (d values) into codes[0, d) with AVX2, four doubles at a time. Work is
// in double so that centring loses nothing: the bound must hold for the float inputs taken as
// exact values. The screened path only runs on AVX2 CPUs, so this needs no portable twin.
__attribute__((target("avx2,fma"))) RowFacts code_row(const float* x, const double* center,
                                                       int64_t d, double* v, int8_t* codes) {
  RowFacts f{};
  const __m256d sign = _mm256_set1_pd(-0.0);
  __m256d amax4 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    const __m256d vj = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j)), _mm256_loadu_pd(center + j));
    _mm256_storeu_pd(v + j, vj);
    amax4 = _mm256_max_pd(amax4, _mm256_andnot_pd(sign, vj));  // max drops NaN: checked below
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, amax4);
  double amax = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
  bool finite = true;
  for (int64_t i = 0; i < j; ++i) finite &= std::isfinite(v[i]);  // vectorises; catches NaN
  for (; j < d; ++j) {
    v[j] = static_cast<double>(x[j]) - center[j];
    finite &= std::isfinite(v[j]);
    amax = std::max(amax, std::fabs(v[j]));
  }
  if (!finite || !(amax <= DBL_MAX)) return f;  // f.finite stays false

  const float scale = amax > 0.0 ? static_cast<float>(amax / kCodeMax) : 1.0f;
  const double inv = 1.0 / scale;
  const __m256d inv4 = _mm256_set1_pd(inv), scale4 = _mm256_set1_pd(scale);
  const __m256d lo = _mm256_set1_pd(-kCodeMax), hi = _mm256_set1_pd(kCodeMax);
  __m256d n2 = _mm256_setzero_pd(), h2 = _mm256_setzero_pd(), e2 = _mm256_setzero_pd();
  __m128i sum4 = _mm_setzero_si128();
  j = 0;
  for (; j + 4 <= d; j += 4) {
    const __m256d vj = _mm256_loadu_pd(v + j);
    // Any rounding of v / scale is sound: the bound uses the residual of the code chosen.
    const __m256d c = _mm256_min_pd(hi, _mm256_max_pd(lo, _mm256_round_pd(_mm256_mul_pd(vj, inv4),
                                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    const __m256d hat = _mm256_mul_pd(scale4, c);
    const __m256d e = _mm256_sub_pd(vj, hat);
    n2 = _mm256_fmadd_pd(vj, vj, n2);
    h2 = _mm256_fmadd_pd(hat, hat, h2);
    e2 = _mm256_fmadd_pd(e, e, e2);
    const __m128i ci = _mm256_cvtpd_epi32(c);  // exact: c is an integer in [-63, 63]
    sum4 = _mm_add_epi32(sum4, ci);
    const int32_t packed4 = _mm_cvtsi128_si32(_mm_packs_epi16(_mm_packs_epi32(ci, ci), ci));
    std::memcpy(codes + j, &packed4, 4);
  }
  double n2s = hsum(n2), h2s = hsum(h2), e2s = hsum(e2);
  int32_t s4[4];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(s4), sum4);
  int32_t sum = (s4[0] + s4[1]) + (s4[2] + s4[3]);
  for (; j < d; ++j) {
    const int c = static_cast<int>(std::clamp(std::nearbyint(v[j] * inv), -1.0 * kCodeMax, 1.0 * kCodeMax));
    const double hat = static_cast<double>(scale) * c;
    n2s += v[j] * v[j];
    h2s += hat * hat;
    e2s += (v[j] - hat) * (v[j] - hat);
    sum += c;
    codes[j] = static_cast<int8_t>(c);
  }
  f.finite = n2s <= DBL_MAX;
  f.scale = scale;
  // Round the bound's ingredients in the safe direction so float storage never shrinks it.
  f.norm2 = static_cast<float>(n2s);
  f.hat_norm = static_cast<float>(std::sqrt(h2s) * (1.0 + 1e-6));
  f.err_norm = static_cast<float>(std::sqrt(e2s) * (1.0 + 1e-6));
  f.code_sum = sum;
  return f;
}

// Codes every row of x - center and records the facts the bound needs. `store(r, codes)` copies
// row r's d codes wherever the caller's layout wants them. Returns false if any value is not
// finite.
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
    std::vector<int8_t> codes(d);
    for (int64_t r = begin; r < end; ++r) {
      const RowFacts f = code_row(x + r * d, center, d, v.data(), codes.data());
      if (!f.finite) {
        finite.store(false, std::memory_order_relaxed);
        continue;
      }
      store(r, codes.data());
      out.scale[r] = f.scale;
      out.norm2[r] = f.norm2;
      out.hat_norm[r] = f.hat_norm;
      out.err_norm[r] = f.err_norm;
      out.code_sum[r] = f.code_sum;
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
  int64_t panel;   // kPanelAvx2 or kPanelVnni: the micro-kernel's packing
  int64_t dp;      // d rounded up to kGroup
  int64_t groups;  // dp / kGroup
  int64_t np;      // n rounded up to kMaxTileCols (a whole number of tiles for either kernel)
  std::vector<uint8_t> qcodes;  // (m, dp) row-major, code + 64, zero padding
  std::vector<int8_t> bpacked;  // (np / panel) panels of (groups, panel, kGroup)
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
  s.np = (s.n + kMaxTileCols - 1) / kMaxTileCols * kMaxTileCols;
  s.qcodes.assign(static_cast<size_t>(s.m * s.dp), 0);
  s.bpacked.assign(static_cast<size_t>(s.np * s.dp), 0);

  const std::vector<double> center = column_means(s.b, s.n, s.d);
  RowCodes qc, bc;
  const int64_t dp = s.dp, panel = s.panel, panel_bytes = s.groups * panel * kGroup;
  uint8_t* qcodes = s.qcodes.data();
  int8_t* packed = s.bpacked.data();
  const int64_t d = s.d;
  if (!code_rows(s.q, s.m, d, center.data(), qc, [&](int64_t r, const int8_t* codes) {
        for (int64_t j = 0; j < d; ++j) qcodes[r * dp + j] = static_cast<uint8_t>(codes[j] + kQueryOffset);
      }))
    return false;
  // Bank row r's codes go to its panel, kGroup of them per group, groups panel * kGroup apart.
  if (!code_rows(s.b, s.n, d, center.data(), bc, [&](int64_t r, const int8_t* codes) {
        int8_t* dst = packed + (r / panel) * panel_bytes + (r % panel) * kGroup;
        for (int64_t j = 0; j < d; ++j) dst[(j / kGroup) * (panel * kGroup) + j % kGroup] = codes[j];
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

// Offers the bank columns t0 + (set bits of mask) to query row r's candidates.
inline void offer(CandidateRows& cands, int64_t r, int64_t t0, uint32_t mask) {
  while (mask) {
    const int bit = __builtin_ctz(mask);
    mask &= mask - 1;
    cands.add(r, t0 + bit);
  }
}

// The AVX2 micro-tile: query rows [rg, rg + nvalid) (task-relative) against bank columns
// [t0, t0 + 16). vpmaddubsw multiplies the unsigned query codes by the signed bank codes into
// int16 pair sums, vpmaddwd against ones widens them to int32 sums of four.
__attribute__((target("avx2,fma"))) void tile_avx2(const Screen& s, int64_t r0, int64_t rg,
                                                    int nvalid, int64_t t0, CandidateRows& cands) {
  constexpr int kTileRows = kTileRowsAvx2, kPanel = kPanelAvx2;
  const int64_t groups = s.groups, panel_bytes = groups * kPanel * kGroup;
  const uint8_t* a[kTileRows];
  for (int i = 0; i < kTileRows; ++i) a[i] = s.qcodes.data() + (r0 + rg + std::min(i, nvalid - 1)) * s.dp;
  const int8_t* p0 = s.bpacked.data() + (t0 / kPanel) * panel_bytes;
  const int8_t* p1 = p0 + panel_bytes;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kTileRows][2];
#pragma GCC unroll 4
  for (int i = 0; i < kTileRows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + g * 32));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + g * 32));
#pragma GCC unroll 4
    for (int i = 0; i < kTileRows; ++i) {
      int32_t w;
      std::memcpy(&w, a[i] + g * kGroup, 4);
      const __m256i av = _mm256_set1_epi32(w);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones));
    }
  }
  const __m256 P0 = _mm256_loadu_ps(&s.P[t0]), P1 = _mm256_loadu_ps(&s.P[t0 + 8]);
  const __m256 S0 = _mm256_loadu_ps(&s.S[t0]), S1 = _mm256_loadu_ps(&s.S[t0 + 8]);
  const __m256 T0 = _mm256_loadu_ps(&s.T[t0]), T1 = _mm256_loadu_ps(&s.T[t0 + 8]);
  const __m256 U0 = _mm256_loadu_ps(&s.U[t0]), U1 = _mm256_loadu_ps(&s.U[t0 + 8]);
  const __m256 V0 = _mm256_loadu_ps(&s.V[t0]), V1 = _mm256_loadu_ps(&s.V[t0 + 8]);
#pragma GCC unroll 4
  for (int i = 0; i < kTileRows; ++i) {
    if (i >= nvalid) break;
    const int64_t r = rg + i, gr = r0 + r;
    const __m256 A = _mm256_set1_ps(s.A[gr]), W = _mm256_set1_ps(s.W[gr]);
    const __m256 X = _mm256_set1_ps(s.X[gr]), Y = _mm256_set1_ps(s.Y[gr]);
    const __m256 Z = _mm256_set1_ps(s.Z[gr]), th = _mm256_set1_ps(cands.threshold(r));
    __m256 lb0 = _mm256_add_ps(A, P0), lb1 = _mm256_add_ps(A, P1);
    lb0 = _mm256_fmadd_ps(_mm256_mul_ps(S0, W), _mm256_cvtepi32_ps(acc[i][0]), lb0);
    lb1 = _mm256_fmadd_ps(_mm256_mul_ps(S1, W), _mm256_cvtepi32_ps(acc[i][1]), lb1);
    lb0 = _mm256_fmadd_ps(T0, X, lb0);
    lb1 = _mm256_fmadd_ps(T1, X, lb1);
    lb0 = _mm256_fmadd_ps(U0, Y, lb0);
    lb1 = _mm256_fmadd_ps(U1, Y, lb1);
    lb0 = _mm256_fmadd_ps(V0, Z, lb0);
    lb1 = _mm256_fmadd_ps(V1, Z, lb1);
    const uint32_t mask =
        static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lb0, th, _CMP_LE_OQ))) |
        (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lb1, th, _CMP_LE_OQ))) << 8);
    offer(cands, r, t0, mask);
  }
}

// The AVX-512 VNNI micro-tile: query rows [rg, rg + nvalid) (task-relative) against bank columns
// [t0, t0 + 32). vpdpbusd multiplies the unsigned query codes by the signed bank codes and adds
// groups of four products straight into int32, so the inner loop is one instruction per 64
// products.
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void tile_vnni(
    const Screen& s, int64_t r0, int64_t rg, int nvalid, int64_t t0, CandidateRows& cands) {
  constexpr int kTileRows = kTileRowsVnni, kPanel = kPanelVnni;
  const int64_t groups = s.groups, panel_bytes = groups * kPanel * kGroup;
  const uint8_t* a[kTileRows];
  for (int i = 0; i < kTileRows; ++i) a[i] = s.qcodes.data() + (r0 + rg + std::min(i, nvalid - 1)) * s.dp;
  const int8_t* p0 = s.bpacked.data() + (t0 / kPanel) * panel_bytes;
  const int8_t* p1 = p0 + panel_bytes;
  __m512i acc[kTileRows][2];
#pragma GCC unroll 8
  for (int i = 0; i < kTileRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i b0 = _mm512_loadu_si512(p0 + g * 64);
    const __m512i b1 = _mm512_loadu_si512(p1 + g * 64);
#pragma GCC unroll 8
    for (int i = 0; i < kTileRows; ++i) {
      int32_t w;
      std::memcpy(&w, a[i] + g * kGroup, 4);
      const __m512i av = _mm512_set1_epi32(w);
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], av, b1);
    }
  }
  const __m512 P0 = _mm512_loadu_ps(&s.P[t0]), P1 = _mm512_loadu_ps(&s.P[t0 + 16]);
  const __m512 S0 = _mm512_loadu_ps(&s.S[t0]), S1 = _mm512_loadu_ps(&s.S[t0 + 16]);
  const __m512 T0 = _mm512_loadu_ps(&s.T[t0]), T1 = _mm512_loadu_ps(&s.T[t0 + 16]);
  const __m512 U0 = _mm512_loadu_ps(&s.U[t0]), U1 = _mm512_loadu_ps(&s.U[t0 + 16]);
  const __m512 V0 = _mm512_loadu_ps(&s.V[t0]), V1 = _mm512_loadu_ps(&s.V[t0 + 16]);
#pragma GCC unroll 8
  for (int i = 0; i < kTileRows; ++i) {
    if (i >= nvalid) break;
    const int64_t r = rg + i, gr = r0 + r;
    const __m512 A = _mm512_set1_ps(s.A[gr]), W = _mm512_set1_ps(s.W[gr]);
    const __m512 X = _mm512_set1_ps(s.X[gr]), Y = _mm512_set1_ps(s.Y[gr]);
    const __m512 Z = _mm512_set1_ps(s.Z[gr]), th = _mm512_set1_ps(cands.threshold(r));
    __m512 lb0 = _mm512_add_ps(A, P0), lb1 = _mm512_add_ps(A, P1);
    lb0 = _mm512_fmadd_ps(_mm512_mul_ps(S0, W), _mm512_cvtepi32_ps(acc[i][0]), lb0);
    lb1 = _mm512_fmadd_ps(_mm512_mul_ps(S1, W), _mm512_cvtepi32_ps(acc[i][1]), lb1);
    lb0 = _mm512_fmadd_ps(T0, X, lb0);
    lb1 = _mm512_fmadd_ps(T1, X, lb1);
    lb0 = _mm512_fmadd_ps(U0, Y, lb0);
    lb1 = _mm512_fmadd_ps(U1, Y, lb1);
    lb0 = _mm512_fmadd_ps(V0, Z, lb0);
    lb1 = _mm512_fmadd_ps(V1, Z, lb1);
    const uint32_t mask = static_cast<uint32_t>(_mm512_cmp_ps_mask(lb0, th, _CMP_LE_OQ)) |
                          (static_cast<uint32_t>(_mm512_cmp_ps_mask(lb1, th, _CMP_LE_OQ)) << 16);
    offer(cands, r, t0, mask);
  }
}

bool cpu_has_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

// One task: query rows [r0, r1) against bank columns [c_begin, c_end) (multiples of
// kMaxTileCols, c_end <= np). Leaves each row's k best (exact squared distances, unsorted) in
// dist/idx, which point at the task's row r0.
void screen_task(const Screen& s, int64_t r0, int64_t r1, int64_t c_begin, int64_t c_end,
                 float* dist, int64_t* idx) {
  const bool vnni = s.panel == kPanelVnni;
  const int64_t rows = r1 - r0, tile_rows = vnni ? kTileRowsVnni : kTileRowsAvx2;
  const int64_t tile_cols = 2 * s.panel;
  CandidateRows cands(s.q, s.b, s.d, s.k, r0, rows, dist, idx);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kBankChunk) {
    const int64_t c1 = std::min(c0 + kBankChunk, c_end);
    for (int64_t rg = 0; rg < rows; rg += tile_rows) {
      const int nvalid = static_cast<int>(std::min(tile_rows, rows - rg));
      for (int64_t t0 = c0; t0 < c1; t0 += tile_cols) {
        if (vnni)
          tile_vnni(s, r0, rg, nvalid, t0, cands);
        else
          tile_avx2(s, r0, rg, nvalid, t0, cands);
      }
    }
    // Re-rank while this chunk's float rows are still in cache, and tighten the thresholds.
    cands.rerank_all();
  }
}

}  // namespace

bool knn_screened_int8(const float* q, int64_t m, const float* b, int64_t n, int64_t d, int64_t k,
                       bool allow_vnni, float* dist, int64_t* idx) {
  // Screening pays when the int8 pass dominates and a small share of rows survive it. Coding the
  // bank costs about as much as the float32 products of kMinQueries query rows against it, so
  // fewer queries than that (PatchCore's reweighting asks for one row per image) go to the GEMM.
  if (!cpu_supports(CpuIsa::kAvx2) || d < 32 || n < 1024 || k * 32 > n || k > 1024 || m < kMinQueries) return false;
  Screen s;
  s.panel = allow_vnni && cpu_has_avx512_vnni() ? kPanelVnni : kPanelAvx2;
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
