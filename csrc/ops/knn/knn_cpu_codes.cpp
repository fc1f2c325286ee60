// CPU kNN, screened path: the int8 coding of rows, and the byte layout of a prepared bank.
//
// The bound. Rows are first centred on the bank's mean (distances are unchanged). Each row x is
// coded as x = s*c + e with a per-row scale s = max|x| / 63, 7-bit codes c in [-63, 63] and a
// residual e. For a query q and a bank row b, with q^ = s_q*c_q and b^ = s_b*c_b,
// Cauchy-Schwarz gives
//     |q.b - q^.b^| <= |e_q| |b^| + |q^| |e_b| + |e_q| |e_b| =: delta
// so ||q - b||^2 >= |q|^2 + |b|^2 - 2 q^.b^ - 2 delta =: LB, where q^.b^ = s_q s_b (c_q . c_b) is
// computed exactly in integers. A bank row whose LB exceeds the k-th best exact distance found so
// far cannot enter the result. A relative slack of kSlack on |q|^2 + |b|^2 covers float32 rounding.
//
// The integer product. The dot-product instructions (vpmaddubsw, vpdpbusd, tdpbusd) multiply
// unsigned by signed bytes, so query codes are stored as c_q + 64 in [1, 127] and the offset is
// removed with the per-row code sums of the bank: c_q . c_b = sum (c_q + 64) c_b - 64 sum c_b.
// With |c| <= 63 no int16 pair sum of vpmaddubsw saturates.
//
// Written out, LB = A + P + (S*W)*acc + T*X + U*Y + V*Z with acc = sum (c_q + 64) c_b and
//   A = |q|^2 (1 - slack)        P = |b|^2 (1 - slack)
//   W = -2 s_q                   S = s_b
//   X = 128 s_q                  T = s_b sum c_b
//   Y = -2 |e_q|                 U = |b^| + |e_b|
//   Z = -2 |q^|                  V = |e_b|
// so a bank column needs P..V, a query row A..Z, and the pair one integer dot product. The same
// terms bound from above: ||q - b||^2 <= |q|^2 + |b|^2 - 2 q^.b^ + 2 delta, i.e.
// UB = (A + P)(1 + kUpperSlack) + (S*W)*acc + T*X - (U*Y + V*Z).
//
// A prepared bank (fastad::knn_prepare) is one uint8 tensor: a 64-byte header, the centre, the
// five column terms and the packed codes, each section starting on a 64-byte boundary. It holds
// no pointers, so it can be copied like any tensor; it is tied to its bank by the shape and a
// fingerprint of sampled rows, checked on every use.
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

#include "knn_cpu_internal.h"

namespace fastad {
namespace knn_detail {
namespace {

constexpr char kMagic[8] = {'f', 'a', 's', 't', 'a', 'd', 'K', 'B'};
constexpr int64_t kLayoutVersion = 1;
constexpr int64_t kFingerprintRows = 64;

struct CodesHeader {
  char magic[8];
  int64_t version, n, d, dp, np;
  uint64_t fingerprint;
  int64_t reserved;
};
static_assert(sizeof(CodesHeader) == 64, "the header is one 64-byte section");

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
    const __m256d vj =
        _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j)), _mm256_loadu_pd(center + j));
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
    const __m256d c = _mm256_min_pd(
        hi, _mm256_max_pd(lo, _mm256_round_pd(_mm256_mul_pd(vj, inv4),
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
    const int c =
        static_cast<int>(std::clamp(std::nearbyint(v[j] * inv), -1.0 * kCodeMax, 1.0 * kCodeMax));
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

// Codes every row of x - center, hands row r's facts and d codes to `store(r, facts, codes)`.
// Returns false if any value is not finite.
template <typename Store>
bool code_rows(const float* x, int64_t rows, int64_t d, const double* center, Store store) {
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
      store(r, f, codes.data());
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

// A hash of the shape and of up to kFingerprintRows evenly spaced rows: cheap enough for every
// call, and it tells a prepared bank from another bank of the same shape.
uint64_t fingerprint(const float* b, int64_t n, int64_t d) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](uint64_t w) {
    h ^= w;
    h *= 0x100000001b3ull;
    h ^= h >> 29;
  };
  mix(static_cast<uint64_t>(n));
  mix(static_cast<uint64_t>(d));
  const int64_t rows = std::min(n, kFingerprintRows);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = rows == 1 ? 0 : i * (n - 1) / (rows - 1);
    const float* row = b + r * d;
    for (int64_t j = 0; j < d; ++j) {
      uint32_t bits;
      std::memcpy(&bits, row + j, 4);
      mix(bits);
    }
  }
  return h;
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Byte offsets of the sections, each on a 64-byte boundary.
struct Layout {
  int64_t center, columns, packed, total;
  explicit Layout(int64_t d, int64_t dp, int64_t np) {
    center = sizeof(CodesHeader);
    columns = center + round_up(d * static_cast<int64_t>(sizeof(double)), 64);
    packed = columns + 5 * round_up(np * static_cast<int64_t>(sizeof(float)), 64);
    total = packed + np * dp;
  }
  int64_t column(int which, int64_t np) const {
    return columns + which * round_up(np * static_cast<int64_t>(sizeof(float)), 64);
  }
};

BankCodes view_of(uint8_t* base, const CodesHeader& h) {
  const Layout lay(h.d, h.dp, h.np);
  BankCodes c;
  c.n = h.n;
  c.d = h.d;
  c.dp = h.dp;
  c.np = h.np;
  c.center = reinterpret_cast<const double*>(base + lay.center);
  c.P = reinterpret_cast<const float*>(base + lay.column(0, h.np));
  c.S = reinterpret_cast<const float*>(base + lay.column(1, h.np));
  c.T = reinterpret_cast<const float*>(base + lay.column(2, h.np));
  c.U = reinterpret_cast<const float*>(base + lay.column(3, h.np));
  c.V = reinterpret_cast<const float*>(base + lay.column(4, h.np));
  c.packed = reinterpret_cast<const int8_t*>(base + lay.packed);
  return c;
}

}  // namespace

at::Tensor code_bank(const float* b, int64_t n, int64_t d) {
  CodesHeader h{};
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.version = kLayoutVersion;
  h.n = n;
  h.d = d;
  h.dp = round_up(d, kDimChunk);
  h.np = round_up(n, kColumnPad);
  h.fingerprint = fingerprint(b, n, d);
  const Layout lay(d, h.dp, h.np);
  at::Tensor out = at::zeros({lay.total}, at::TensorOptions().dtype(at::kByte));
  uint8_t* base = out.data_ptr<uint8_t>();
  std::memcpy(base, &h, sizeof(h));
  const std::vector<double> center = column_means(b, n, d);
  std::memcpy(base + lay.center, center.data(), d * sizeof(double));

  float* cols[5];
  for (int w = 0; w < 5; ++w) cols[w] = reinterpret_cast<float*>(base + lay.column(w, h.np));
  std::fill(cols[0] + n, cols[0] + h.np, std::numeric_limits<float>::quiet_NaN());
  int8_t* packed = reinterpret_cast<int8_t*>(base + lay.packed);
  const int64_t panel_bytes = h.dp * kPanel;
  const bool finite =
      code_rows(b, n, d, center.data(), [&](int64_t r, const RowFacts& f, const int8_t* codes) {
        // Row r's codes go to its panel, kGroup of them per group, groups kPanel * kGroup apart.
        int8_t* dst = packed + (r / kPanel) * panel_bytes + (r % kPanel) * kGroup;
        for (int64_t j = 0; j < d; ++j)
          dst[(j / kGroup) * (kPanel * kGroup) + j % kGroup] = codes[j];
        cols[0][r] = f.norm2 * (1.0f - kSlack);
        cols[1][r] = f.scale;
        cols[2][r] = f.scale * static_cast<float>(f.code_sum);
        cols[3][r] = f.hat_norm + f.err_norm;
        cols[4][r] = f.err_norm;
      });
  if (!finite) return at::empty({0}, at::TensorOptions().dtype(at::kByte));
  return out;
}

BankCodes view_bank_codes(const at::Tensor& codes, const float* b, int64_t n, int64_t d) {
  const char* remedy = "; make it again with fastad.ops.knn_prepare(bank)";
  TORCH_CHECK_VALUE(
      codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 1 &&
          codes.is_contiguous(),
      "prepared must be the 1-D uint8 CPU tensor that fastad.ops.knn_prepare(bank) returns, got ",
      codes.scalar_type(), " of shape ", codes.sizes(), " on ", codes.device());
  TORCH_CHECK_VALUE(codes.numel() >= static_cast<int64_t>(sizeof(CodesHeader)),
                    "prepared is too short to be a prepared bank", remedy);
  CodesHeader h;
  uint8_t* base = codes.data_ptr<uint8_t>();
  std::memcpy(&h, base, sizeof(h));
  TORCH_CHECK_VALUE(
      std::memcmp(h.magic, kMagic, sizeof(kMagic)) == 0 && h.version == kLayoutVersion,
      "prepared is not a prepared bank of this fastad build", remedy);
  TORCH_CHECK_VALUE(h.n == n && h.d == d, "prepared was made for a bank of shape (", h.n, ", ", h.d,
                    "), not this bank of shape (", n, ", ", d, ")", remedy);
  TORCH_CHECK_VALUE(h.dp == round_up(d, kDimChunk) && h.np == round_up(n, kColumnPad) &&
                        codes.numel() == Layout(d, h.dp, h.np).total,
                    "prepared has a corrupt layout", remedy);
  TORCH_CHECK_VALUE(h.fingerprint == fingerprint(b, n, d),
                    "prepared was made for another bank, or the bank has changed since", remedy);
  return view_of(base, h);
}

bool code_queries(const float* q, int64_t m, const BankCodes& bank, QueryCodes& out) {
  const int64_t d = bank.d, dp = bank.dp;
  out.m = m;
  out.m_pad = round_up(m, kQueryRowPad);
  out.codes.assign(static_cast<size_t>(out.m_pad * dp), 0);
  out.A.resize(m);
  out.W.resize(m);
  out.X.resize(m);
  out.Y.resize(m);
  out.Z.resize(m);
  uint8_t* qcodes = out.codes.data();
  return code_rows(q, m, d, bank.center, [&](int64_t r, const RowFacts& f, const int8_t* codes) {
    for (int64_t j = 0; j < d; ++j)
      qcodes[r * dp + j] = static_cast<uint8_t>(codes[j] + kQueryOffset);
    out.A[r] = f.norm2 * (1.0f - kSlack);
    out.W[r] = -2.0f * f.scale;
    out.X[r] = 2.0f * kQueryOffset * f.scale;
    out.Y[r] = -2.0f * f.err_norm;
    out.Z[r] = -2.0f * f.hat_norm;
  });
}

}  // namespace knn_detail
}  // namespace fastad
