// CPU kNN: validation, path choice, the float32 GEMM-tile path and the shared finishing step.
// The faster screened path (int8 first pass + exact re-ranking) lives in knn_cpu_screened.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "fastad/cpu_isa.h"
#include "fastad/distance.h"
#include "fastad/topk.h"
#include "knn.h"
#include "knn_cpu_internal.h"

namespace fastad {
namespace knn_detail {

__attribute__((target("avx2,fma"))) static float squared_distance_avx2(const float* a,
                                                                       const float* b, int64_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j));
    const __m256 x1 = _mm256_sub_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8));
    s0 = _mm256_fmadd_ps(x0, x0, s0);
    s1 = _mm256_fmadd_ps(x1, x1, s1);
  }
  for (; j + 8 <= d; j += 8) {
    const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j));
    s0 = _mm256_fmadd_ps(x0, x0, s0);
  }
  s0 = _mm256_add_ps(s0, s1);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float s = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
  for (; j < d; ++j) {
    const float x = a[j] - b[j];
    s += x * x;
  }
  return s;
}

float squared_distance(const float* a, const float* b, int64_t d) {
  return cpu_supports(CpuIsa::kAvx2) ? squared_distance_avx2(a, b, d)
                                     : squared_distance_portable(a, b, d);
}

// Squared norms accumulated in double: they enter every distance, so their error must not.
std::vector<float> squared_row_norms(const float* x, int64_t rows, int64_t d) {
  std::vector<float> out(rows);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * d;
      double s = 0.0;
      for (int64_t j = 0; j < d; ++j) s += static_cast<double>(row[j]) * row[j];
      out[r] = static_cast<float>(s);
    }
  });
  return out;
}

void finish_rows(int64_t m, int64_t k, bool squared, float* dist, int64_t* idx) {
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> row(k);
    for (int64_t r = begin; r < end; ++r) {
      float* dr = dist + r * k;
      int64_t* ir = idx + r * k;
      for (int64_t j = 0; j < k; ++j) row[j] = {dr[j], ir[j]};
      std::sort(row.begin(), row.end());
      for (int64_t j = 0; j < k; ++j) {
        const float v = std::max(row[j].first, 0.0f);
        dr[j] = squared ? v : std::sqrt(v);
        ir[j] = row[j].second;
      }
    }
  });
}

// The float32 path: norms + one BLAS GEMM per (query block, bank tile) into a reused tile, then
// a parallel screen that rejects most entries with one comparison against the row's k-th best.
// A float32 dot product of length d is off by at most about d * 2^-24 * |q| |b|, which the
// slack on |q|^2 + |b|^2 covers, so every possible member of the result gets re-ranked exactly.
void knn_gemm_tiles(const float* q, int64_t m, const float* b, int64_t n, int64_t d, int64_t k,
                    float* dist, int64_t* idx) {
  const float slack = 1.0f - static_cast<float>(d + 8) * 1.2e-7f;
  auto qn = squared_row_norms(q, m, d);
  auto bn = squared_row_norms(b, n, d);
  for (auto& v : qn) v *= slack;
  for (auto& v : bn) v *= slack;
  const int64_t mt = std::min<int64_t>(m, 1024);
  const int64_t nt = std::min<int64_t>(n, 4096);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor Q = at::from_blob(const_cast<float*>(q), {m, d}, opts);
  at::Tensor B = at::from_blob(const_cast<float*>(b), {n, d}, opts);
  at::Tensor tile_storage = at::empty({mt * nt}, opts);

  for (int64_t m0 = 0; m0 < m; m0 += mt) {
    const int64_t mb = std::min(mt, m - m0);
    CandidateRows rows(q, b, d, k, m0, mb, dist + m0 * k, idx + m0 * k);
    for (int64_t n0 = 0; n0 < n; n0 += nt) {
      const int64_t nb = std::min(nt, n - n0);
      at::Tensor tile = tile_storage.narrow(0, 0, mb * nb).view({mb, nb});
      at::mm_out(tile, Q.narrow(0, m0, mb), B.narrow(0, n0, nb).t());
      const float* t = tile.data_ptr<float>();
      at::parallel_for(0, mb, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* tr = t + r * nb;
          const float qr = qn[m0 + r];
          for (int64_t c = 0; c < nb; ++c) {
            const float lower = qr + bn[n0 + c] - 2.0f * tr[c];
            // Written so that NaN passes: it is re-ranked as +inf, never left as a sentinel.
            if (!(lower > rows.threshold(r))) rows.add(r, n0 + c);
          }
          rows.rerank(r);
        }
      });
    }
  }
}

}  // namespace knn_detail

namespace {

// Below this many dims the codes (each row padded to 64 dims, one AMX tile row of bytes) would
// take over twice the float rows' memory in a prepared bank. Down to it the screen wins clearly:
// at SPADE's first Lite0 layer (3136 queries, 156,800 gallery rows, D = 24, k = 1) 72 ms with AMX,
// 93 with VNNI and 172 with AVX2 against 299 ms on the float32 path; 70 against 261 ms at D = 8.
// (Up to 2026-12 the screen started at D = 32.)
constexpr int64_t kMinScreenDim = 8;

// The screen needs AVX2, enough dims to be worth its codes (kMinScreenDim), a width its int32
// sums hold exactly, and room to rule rows out (k well below n). Without a prepared bank it must
// also code the bank, which costs about as much as the float32 products of 64 query rows against
// it: fewer rows, or a small bank, go to the GEMM.
bool screen_suits(int64_t m, int64_t n, int64_t d, int64_t k, bool prepared) {
  if (!cpu_supports(CpuIsa::kAvx2) || d < kMinScreenDim || d > knn_detail::kMaxScreenDim ||
      k > 1024 || k * 32 > n)
    return false;
  return prepared || (n >= 1024 && m >= 64);
}

bool prepares(int64_t d) {
  return cpu_supports(CpuIsa::kAvx2) && d >= kMinScreenDim && d <= knn_detail::kMaxScreenDim;
}

// FASTAD_KNN_CPU_ISA (the convention of fastad/env_choice.h) picks a lesser path than the best this
// CPU has, so that tests and benchmarks reach every kernel on one machine: portable (the float32
// GEMM path), avx2, vnni or amx (the screen's micro-kernels). A kernel the CPU lacks falls back to
// the next lesser one.
struct CpuPath {
  bool gemm;
  knn_detail::ScreenKernel kernel;
};

CpuPath cpu_path() {
  using knn_detail::ScreenKernel;
  enum Level : size_t { kGemm, kAvx2Screen, kVnniScreen, kAmxScreen };
  const size_t level = env_choice("FASTAD_KNN_CPU_ISA", {"portable", "avx2", "vnni", "amx"});
  ScreenKernel kernel = ScreenKernel::kAvx2;
  if (level >= kVnniScreen && cpu_avx512_vnni()) kernel = ScreenKernel::kVnni;
  if (level >= kAmxScreen && cpu_amx_int8_ready() && cpu_supports(CpuIsa::kAvx512))
    kernel = ScreenKernel::kAmx;
  return {level == kGemm, kernel};
}

// Float32 contiguous copies (views when they are already).
at::Tensor as_float_rows(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& bank,
                                           int64_t k, bool squared,
                                           const std::optional<at::Tensor>& prepared) {
  check_knn_args(query, bank, k);
  const int64_t m = query.size(0), n = bank.size(0), d = query.size(1);
  at::Tensor dist = at::empty({m, k}, query.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({m, k}, query.options().dtype(at::kLong));

  const at::Tensor b = as_float_rows(bank);
  const float* bp = b.data_ptr<float>();
  // A prepared bank is checked on every call, whichever path runs, so a stale one never passes
  // unnoticed. An empty one means knn_prepare found nothing to prepare.
  const bool has_codes = prepared.has_value() && prepared->numel() > 0;
  knn_detail::BankCodes codes;
  if (has_codes) codes = knn_detail::view_bank_codes(*prepared, bp, n, d);
  if (m == 0) return {dist, idx};

  const at::Tensor q = as_float_rows(query);
  const float* qp = q.data_ptr<float>();
  float* dp = dist.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();

  const CpuPath path = cpu_path();
  bool screened = false;
  if (!path.gemm && screen_suits(m, n, d, k, has_codes)) {
    at::Tensor own_codes;
    if (!has_codes) {
      own_codes = knn_detail::code_bank(bp, n, d);  // empty when the bank has non-finite values
      if (own_codes.numel() > 0) codes = knn_detail::view_bank_codes(own_codes, bp, n, d);
    }
    if (has_codes || own_codes.numel() > 0)
      screened = knn_detail::knn_screened_int8(qp, m, bp, codes, k, path.kernel, dp, ip);
  }
  if (!screened) knn_detail::knn_gemm_tiles(qp, m, bp, n, d, k, dp, ip);
  knn_detail::finish_rows(m, k, squared, dp, ip);
  return {dist, idx};
}

at::Tensor knn_prepare_cpu(const at::Tensor& bank) {
  check_knn_bank(bank);
  const int64_t n = bank.size(0), d = bank.size(1);
  if (!prepares(d)) return at::empty({0}, bank.options().dtype(at::kByte));
  const at::Tensor b = as_float_rows(bank);
  return knn_detail::code_bank(b.data_ptr<float>(), n, d);
}

TORCH_LIBRARY_IMPL(fastad, CPU, m) {
  m.impl("knn", &knn_cpu);
  m.impl("knn_prepare", &knn_prepare_cpu);
}

}  // namespace fastad
