// CPU kNN, screened path: a cheap int8 first pass that proves most bank rows cannot be among the
// k nearest, and exact float32 re-ranking of every row it cannot rule out. The result is exact.
// The coding and the bound are in knn_cpu_codes.cpp; this file holds the micro-kernels that
// compute the integer dot products and the bound, and the tasks that drive them.
//
// Why int8: on AVX2 an int8 multiply-add pair (vpmaddubsw + vpmaddwd) does 32 products where an
// FP32 FMA does 8; with AVX-512 VNNI one vpdpbusd does 64 where an FP32 FMA does 16; an AMX
// tdpbusd does 16 x 16 x 64 products in one instruction. The re-ranking touches only a few
// hundred rows per query. The three micro-kernels share the packing, the bound and the tasks:
//   AVX2   4 query rows x 16 bank columns (two 8-column halves of one panel)
//   VNNI   8 query rows x 32 bank columns (two panels)
//   AMX   32 query rows x 32 bank columns (2 x 2 tiles of 16 x 16 int32 sums), whose sums are
//         stored to a small buffer and bounded by the VNNI kernel's epilogue
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastad/topk.h"
#include "knn_cpu_internal.h"

namespace fastad {
namespace knn_detail {
namespace {

constexpr int kTileRowsAvx2 = 4;     // 8 accumulators + 2 halves + 1 broadcast of 16 ymm registers
constexpr int kTileRowsVnni = 8;     // 16 accumulators + 2 panels + 1 broadcast of 32 zmm registers
constexpr int kTileRowsAmx = 32;     // two 16-row A tiles
constexpr int64_t kQueryBlock = 64;  // query rows per task (a multiple of every kernel's rows)
constexpr int64_t kBankChunk = 512;  // bank columns per chunk: its int8 panels stay in L2

// Everything the tasks read; built once per call.
struct Screen {
  const float* q;
  const float* b;
  int64_t d, k;
  int64_t groups;  // dims in use / kGroup: the AVX2 and VNNI kernels skip the padding groups
  const BankCodes* bank;
  const QueryCodes* query;
};

// Offers the bank columns t0 + (set bits of mask) to query row r's candidates.
inline void offer(CandidateRows& cands, int64_t r, int64_t t0, uint32_t mask) {
  while (mask) {
    const int bit = __builtin_ctz(mask);
    mask &= mask - 1;
    cands.add(r, t0 + bit);
  }
}

// Upper bounds only where a lower bound passes. A column whose lower bound exceeds the row's
// threshold t has an upper bound above t too (UB >= LB: the delta terms enter with opposite signs
// and the slack is positive), and offering such a bound never lowers the threshold, now or later:
// the threshold is the smaller of the k-th exact distance and the k-th smallest bound offered, and
// a bound above t is never among k bounds all below t. So the micro-kernels test the lower bounds
// first and compute upper bounds only for tiles where some column passes; once the threshold is
// tight that skips most of the epilogue (SPADE's first Lite0 layer: 3136 x 156,800 pairs, k = 1).

// Bit c set where lower bound c (of 16 or 32 columns, two vectors) is at most the threshold.
__attribute__((target("avx2,fma"), always_inline)) inline uint32_t passing256(__m256 lb0,
                                                                              __m256 lb1, float t) {
  const __m256 th = _mm256_set1_ps(t);
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lb0, th, _CMP_LE_OQ))) |
         (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lb1, th, _CMP_LE_OQ))) << 8);
}

__attribute__((target("avx512f"), always_inline)) inline uint32_t passing512(__m512 lb0, __m512 lb1,
                                                                             float t) {
  const __m512 th = _mm512_set1_ps(t);
  return static_cast<uint32_t>(_mm512_cmp_ps_mask(lb0, th, _CMP_LE_OQ)) |
         (static_cast<uint32_t>(_mm512_cmp_ps_mask(lb1, th, _CMP_LE_OQ)) << 16);
}

// Offers the upper bounds ub[bit] of the set bits of mask to query row r.
inline void offer_upper(CandidateRows& cands, int64_t r, const float* ub, uint32_t mask) {
  while (mask) {
    const int bit = __builtin_ctz(mask);
    mask &= mask - 1;
    cands.offer_upper(r, ub[bit]);
  }
}

// The AVX2 micro-tile: query rows [rg, rg + nvalid) (task-relative) against bank columns
// [t0, t0 + 16). vpmaddubsw multiplies the unsigned query codes by the signed bank codes into
// int16 pair sums, vpmaddwd against ones widens them to int32 sums of four.
__attribute__((target("avx2,fma"))) void tile_avx2(const Screen& s, int64_t r0, int64_t rg,
                                                   int nvalid, int64_t t0, CandidateRows& cands) {
  constexpr int kTileRows = kTileRowsAvx2;
  const BankCodes& bk = *s.bank;
  const QueryCodes& qc = *s.query;
  const uint8_t* a[kTileRows];
  for (int i = 0; i < kTileRows; ++i)
    a[i] = qc.codes.data() + (r0 + rg + std::min(i, nvalid - 1)) * bk.dp;
  const int8_t* p = bk.packed + (t0 / kPanel) * bk.panel_bytes();
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kTileRows][2];
#pragma GCC unroll 4
  for (int i = 0; i < kTileRows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < s.groups; ++g) {
    const __m256i b0 =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + g * kPanel * kGroup));
    const __m256i b1 =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + g * kPanel * kGroup + 32));
#pragma GCC unroll 4
    for (int i = 0; i < kTileRows; ++i) {
      int32_t w;
      std::memcpy(&w, a[i] + g * kGroup, 4);
      const __m256i av = _mm256_set1_epi32(w);
      acc[i][0] =
          _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones));
      acc[i][1] =
          _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones));
    }
  }
  const __m256 P0 = _mm256_loadu_ps(bk.P + t0), P1 = _mm256_loadu_ps(bk.P + t0 + 8);
  const __m256 S0 = _mm256_loadu_ps(bk.S + t0), S1 = _mm256_loadu_ps(bk.S + t0 + 8);
  const __m256 T0 = _mm256_loadu_ps(bk.T + t0), T1 = _mm256_loadu_ps(bk.T + t0 + 8);
  const __m256 U0 = _mm256_loadu_ps(bk.U + t0), U1 = _mm256_loadu_ps(bk.U + t0 + 8);
  const __m256 V0 = _mm256_loadu_ps(bk.V + t0), V1 = _mm256_loadu_ps(bk.V + t0 + 8);
  const __m256 cu = _mm256_set1_ps(kUpperSlack);
  for (int i = 0; i < nvalid; ++i) {
    const int64_t r = rg + i, gr = r0 + r;
    const __m256 A = _mm256_set1_ps(qc.A[gr]), W = _mm256_set1_ps(qc.W[gr]);
    const __m256 X = _mm256_set1_ps(qc.X[gr]), Y = _mm256_set1_ps(qc.Y[gr]);
    const __m256 Z = _mm256_set1_ps(qc.Z[gr]);
    const __m256 ap0 = _mm256_add_ps(A, P0), ap1 = _mm256_add_ps(A, P1);
    // The estimate of the squared distance and -2 delta (see knn_cpu_codes.cpp).
    __m256 e0 = _mm256_fmadd_ps(_mm256_mul_ps(S0, W), _mm256_cvtepi32_ps(acc[i][0]), ap0);
    __m256 e1 = _mm256_fmadd_ps(_mm256_mul_ps(S1, W), _mm256_cvtepi32_ps(acc[i][1]), ap1);
    e0 = _mm256_fmadd_ps(T0, X, e0);
    e1 = _mm256_fmadd_ps(T1, X, e1);
    const __m256 d0 = _mm256_fmadd_ps(V0, Z, _mm256_mul_ps(U0, Y));
    const __m256 d1 = _mm256_fmadd_ps(V1, Z, _mm256_mul_ps(U1, Y));
    const __m256 lb0 = _mm256_add_ps(e0, d0), lb1 = _mm256_add_ps(e1, d1);
    if (passing256(lb0, lb1, cands.threshold(r)) == 0)
      continue;  // lower bounds first, as in bound_row512
    const __m256 ub0 = _mm256_fmadd_ps(ap0, cu, _mm256_sub_ps(e0, d0));
    const __m256 ub1 = _mm256_fmadd_ps(ap1, cu, _mm256_sub_ps(e1, d1));
    const __m256 uth = _mm256_set1_ps(cands.upper_threshold(r));
    const uint32_t umask =
        static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(ub0, uth, _CMP_LT_OQ))) |
        (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(ub1, uth, _CMP_LT_OQ))) << 8);
    if (umask) {
      alignas(32) float ub[16];
      _mm256_store_ps(ub, ub0);
      _mm256_store_ps(ub + 8, ub1);
      offer_upper(cands, r, ub, umask);
    }
    offer(cands, r, t0, passing256(lb0, lb1, cands.threshold(r)));
  }
}

// Bank-column terms of a 32-column tile, loaded once for all its query rows.
struct ColumnTerms512 {
  __m512 P[2], S[2], T[2], U[2], V[2];
};

__attribute__((target("avx512f"), always_inline)) inline ColumnTerms512 load_terms512(
    const BankCodes& bk, int64_t t0) {
  ColumnTerms512 c;
  for (int h = 0; h < 2; ++h) {
    c.P[h] = _mm512_loadu_ps(bk.P + t0 + 16 * h);
    c.S[h] = _mm512_loadu_ps(bk.S + t0 + 16 * h);
    c.T[h] = _mm512_loadu_ps(bk.T + t0 + 16 * h);
    c.U[h] = _mm512_loadu_ps(bk.U + t0 + 16 * h);
    c.V[h] = _mm512_loadu_ps(bk.V + t0 + 16 * h);
  }
  return c;
}

// int32 -> float32 of all 16 lanes. Written with a full mask because GCC 12 warns (wrongly) about
// the undefined pass-through register of _mm512_cvtepi32_ps once it is inlined; same instruction.
__attribute__((target("avx512f"), always_inline)) inline __m512 to_float512(__m512i x) {
  return _mm512_mask_cvtepi32_ps(_mm512_setzero_ps(), 0xFFFF, x);
}

// The bounds of query row r (task-relative) against bank columns [t0, t0 + 32) from their integer
// sums: the upper bounds tighten the row's threshold, then every column whose lower bound does
// not exceed it is offered for re-ranking.
__attribute__((target("avx512f"), always_inline)) inline void bound_row512(
    const Screen& s, const ColumnTerms512& c, int64_t r0, int64_t r, int64_t t0, __m512i acc0,
    __m512i acc1, CandidateRows& cands) {
  const QueryCodes& qc = *s.query;
  const int64_t gr = r0 + r;
  const __m512 A = _mm512_set1_ps(qc.A[gr]), W = _mm512_set1_ps(qc.W[gr]);
  const __m512 X = _mm512_set1_ps(qc.X[gr]), Y = _mm512_set1_ps(qc.Y[gr]);
  const __m512 Z = _mm512_set1_ps(qc.Z[gr]), cu = _mm512_set1_ps(kUpperSlack);
  const __m512 ap0 = _mm512_add_ps(A, c.P[0]), ap1 = _mm512_add_ps(A, c.P[1]);
  // The estimate of the squared distance and -2 delta (see knn_cpu_codes.cpp).
  __m512 e0 = _mm512_fmadd_ps(_mm512_mul_ps(c.S[0], W), to_float512(acc0), ap0);
  __m512 e1 = _mm512_fmadd_ps(_mm512_mul_ps(c.S[1], W), to_float512(acc1), ap1);
  e0 = _mm512_fmadd_ps(c.T[0], X, e0);
  e1 = _mm512_fmadd_ps(c.T[1], X, e1);
  const __m512 d0 = _mm512_fmadd_ps(c.V[0], Z, _mm512_mul_ps(c.U[0], Y));
  const __m512 d1 = _mm512_fmadd_ps(c.V[1], Z, _mm512_mul_ps(c.U[1], Y));
  const __m512 lb0 = _mm512_add_ps(e0, d0), lb1 = _mm512_add_ps(e1, d1);
  // Lower bounds first: once the threshold is tight almost no column passes, and then the upper
  // bounds cannot matter (see "Upper bounds only where a lower bound passes"), so most tiles end
  // here.
  if (passing512(lb0, lb1, cands.threshold(r)) == 0) return;
  const __m512 ub0 = _mm512_fmadd_ps(ap0, cu, _mm512_sub_ps(e0, d0));
  const __m512 ub1 = _mm512_fmadd_ps(ap1, cu, _mm512_sub_ps(e1, d1));
  const __m512 uth = _mm512_set1_ps(cands.upper_threshold(r));
  const uint32_t umask = static_cast<uint32_t>(_mm512_cmp_ps_mask(ub0, uth, _CMP_LT_OQ)) |
                         (static_cast<uint32_t>(_mm512_cmp_ps_mask(ub1, uth, _CMP_LT_OQ)) << 16);
  if (umask) {
    alignas(64) float ub[32];
    _mm512_store_ps(ub, ub0);
    _mm512_store_ps(ub + 16, ub1);
    offer_upper(cands, r, ub, umask);
  }
  offer(cands, r, t0, passing512(lb0, lb1, cands.threshold(r)));
}

// The AVX-512 VNNI micro-tile: query rows [rg, rg + nvalid) (task-relative) against bank columns
// [t0, t0 + 32). vpdpbusd multiplies the unsigned query codes by the signed bank codes and adds
// groups of four products straight into int32, so the inner loop is one instruction per 64
// products.
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void tile_vnni(
    const Screen& s, int64_t r0, int64_t rg, int nvalid, int64_t t0, CandidateRows& cands) {
  constexpr int kTileRows = kTileRowsVnni;
  const BankCodes& bk = *s.bank;
  const QueryCodes& qc = *s.query;
  const uint8_t* a[kTileRows];
  for (int i = 0; i < kTileRows; ++i)
    a[i] = qc.codes.data() + (r0 + rg + std::min(i, nvalid - 1)) * bk.dp;
  const int8_t* p0 = bk.packed + (t0 / kPanel) * bk.panel_bytes();
  const int8_t* p1 = p0 + bk.panel_bytes();
  __m512i acc[kTileRows][2];
#pragma GCC unroll 8
  for (int i = 0; i < kTileRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < s.groups; ++g) {
    const __m512i b0 = _mm512_loadu_si512(p0 + g * kPanel * kGroup);
    const __m512i b1 = _mm512_loadu_si512(p1 + g * kPanel * kGroup);
#pragma GCC unroll 8
    for (int i = 0; i < kTileRows; ++i) {
      int32_t w;
      std::memcpy(&w, a[i] + g * kGroup, 4);
      const __m512i av = _mm512_set1_epi32(w);
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], av, b1);
    }
  }
  const ColumnTerms512 terms = load_terms512(bk, t0);
#pragma GCC unroll 8
  for (int i = 0; i < kTileRows; ++i) {
    if (i >= nvalid) break;
    bound_row512(s, terms, r0, rg + i, t0, acc[i][0], acc[i][1], cands);
  }
}

// AMX tile configuration (palette 1): tiles 0-3 hold the 2 x 2 blocks of int32 sums, 4-5 the two
// 16-row slices of query codes, 6-7 the two 16-column panels of bank codes, each 16 rows of 64
// bytes. Tile registers are per thread, so each task loads it and releases it.
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  AmxConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

__attribute__((target("amx-tile"))) void amx_begin() {
  static const AmxConfig config;
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }

// The AMX micro-tile: query rows [rg, rg + nvalid) (task-relative; the codes are padded to whole
// 32-row groups with zeros) against bank columns [t0, t0 + 32). The dims go 64 at a time: a query
// tile row is 64 codes, a bank tile row the 4-code groups of 16 columns, which is how the panels
// are packed already.
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw"))) void tile_amx(const Screen& s,
                                                                            int64_t r0, int64_t rg,
                                                                            int nvalid, int64_t t0,
                                                                            CandidateRows& cands) {
  const BankCodes& bk = *s.bank;
  const QueryCodes& qc = *s.query;
  const uint8_t* a = qc.codes.data() + (r0 + rg) * bk.dp;
  const int8_t* p0 = bk.packed + (t0 / kPanel) * bk.panel_bytes();
  const int8_t* p1 = p0 + bk.panel_bytes();
  const int64_t chunk_bytes =
      kDimChunk * kPanel;  // one bank tile: 16 groups of 16 columns x 4 codes
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < bk.dp / kDimChunk; ++c) {
    _tile_loadd(4, a + c * kDimChunk, bk.dp);
    _tile_loadd(5, a + 16 * bk.dp + c * kDimChunk, bk.dp);
    _tile_loadd(6, p0 + c * chunk_bytes, kPanel * kGroup);
    _tile_loadd(7, p1 + c * chunk_bytes, kPanel * kGroup);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  alignas(64) int32_t sums[kTileRowsAmx][32];
  constexpr int64_t stride = 32 * sizeof(int32_t);
  _tile_stored(0, &sums[0][0], stride);
  _tile_stored(1, &sums[0][16], stride);
  _tile_stored(2, &sums[16][0], stride);
  _tile_stored(3, &sums[16][16], stride);
  const ColumnTerms512 terms = load_terms512(bk, t0);
  for (int i = 0; i < nvalid; ++i)
    bound_row512(s, terms, r0, rg + i, t0, _mm512_load_si512(&sums[i][0]),
                 _mm512_load_si512(&sums[i][16]), cands);
}

// One task: query rows [r0, r1) against bank columns [c_begin, c_end) (multiples of kColumnPad,
// c_end <= np). Leaves each row's k best (exact squared distances, unsorted) in dist/idx, which
// point at the task's row r0.
void screen_task(const Screen& s, ScreenKernel kernel, int64_t r0, int64_t r1, int64_t c_begin,
                 int64_t c_end, float* dist, int64_t* idx) {
  const int64_t rows = r1 - r0;
  const int64_t tile_rows = kernel == ScreenKernel::kAmx    ? kTileRowsAmx
                            : kernel == ScreenKernel::kVnni ? kTileRowsVnni
                                                            : kTileRowsAvx2;
  const int64_t tile_cols = kernel == ScreenKernel::kAvx2 ? kPanel : 2 * kPanel;
  CandidateRows cands(s.q, s.b, s.d, s.k, r0, rows, dist, idx);
  if (kernel == ScreenKernel::kAmx) amx_begin();
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kBankChunk) {
    const int64_t c1 = std::min(c0 + kBankChunk, c_end);
    for (int64_t rg = 0; rg < rows; rg += tile_rows) {
      const int nvalid = static_cast<int>(std::min(tile_rows, rows - rg));
      for (int64_t t0 = c0; t0 < c1; t0 += tile_cols) {
        switch (kernel) {
          case ScreenKernel::kAmx:
            tile_amx(s, r0, rg, nvalid, t0, cands);
            break;
          case ScreenKernel::kVnni:
            tile_vnni(s, r0, rg, nvalid, t0, cands);
            break;
          default:
            tile_avx2(s, r0, rg, nvalid, t0, cands);
        }
      }
    }
    // Re-rank while this chunk's float rows are still in cache, and tighten the thresholds.
    cands.rerank_all();
  }
  if (kernel == ScreenKernel::kAmx) amx_end();
}

}  // namespace

bool knn_screened_int8(const float* q, int64_t m, const float* b, const BankCodes& bank, int64_t k,
                       ScreenKernel kernel, float* dist, int64_t* idx) {
  QueryCodes query;
  if (!code_queries(q, m, bank, query)) return false;
  Screen s{q, b, bank.d, k, (bank.d + kGroup - 1) / kGroup, &bank, &query};

  // Tasks: blocks of query rows; when there are fewer blocks than threads (small batches, the
  // inline-inspection case), the bank is split too and the partial results merged.
  const int64_t row_blocks = (m + kQueryBlock - 1) / kQueryBlock;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = (bank.np + kBankChunk - 1) / kBankChunk;
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
      const int64_t c1 = std::min(bank.np, c0 + chunks_per_split * kBankChunk);
      float* dd = splits > 1 ? part_d.data() + (sp * m + r0) * k : dist + r0 * k;
      int64_t* ii = splits > 1 ? part_i.data() + (sp * m + r0) * k : idx + r0 * k;
      if (c0 < c1) {
        screen_task(s, kernel, r0, r1, c0, c1, dd, ii);
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
