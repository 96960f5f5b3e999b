// Format "trellis", portable kernels: the code table, and the reference decode kernels for
// trellis_avx2.cpp (forced with force_scalar or QUIPC_FORCE_SCALAR) and CPUs without AVX2.
#include <cmath>
#include <vector>

#include "gemm_driver.h"
#include "kernels.h"
#include "trellis.h"
#include "ukernel_scalar.h"

namespace quipc {

namespace {

// The invertible hash of formats/trellis.py's state_hash (12 bits).
uint32_t state_hash(uint32_t x) {
  const uint32_t mask = (1u << kTrellisL) - 1, shift = kTrellisL / 2 + 1;
  const uint64_t mults[2] = {0x9E3779B1ull, 0x85EBCA77ull};
  uint64_t v = x;
  for (uint64_t mult : mults) {
    v ^= v >> shift;
    v = (v * mult) & mask;
  }
  return uint32_t(v ^ (v >> shift));
}

// The standard-normal quantile of p: bisection on erfc to the last double.
double normal_quantile(double p) {
  double lo = -40.0, hi = 40.0;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid == lo || mid == hi) break;
    (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

}  // namespace

const int8_t* trellis256_row_code() {
  static const std::vector<int8_t> a8 = [] {
    std::vector<double> q(256);
    for (int p = 0; p < 256; ++p) q[size_t(p)] = normal_quantile((p + 0.5) / 256);
    std::vector<int8_t> a(256);
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 16; ++c) {
        const long v = std::lround(q[size_t(16 * c + r)] * 127.0 / q[255]);
        a[size_t(16 * r + c)] = int8_t(v);
        a[size_t(16 * (r + 8) + c)] = int8_t(-v);
      }
    return a;
  }();
  return a8.data();
}

namespace {
double row_code_rms() {  // in double: the table divides by it before rounding to float, as numpy does
  const int8_t* a = trellis256_row_code();
  double sq = 0.0;
  for (int x = 0; x < 256; ++x) sq += double(a[x]) * a[x];
  return std::sqrt(sq / 256);
}
}  // namespace

float trellis256_rms() {
  static const float rms = float(row_code_rms());
  return rms;
}

const float* trellis256_code_table() {
  static const std::vector<float> table = [] {
    const int8_t* a = trellis256_row_code();
    const double rms = row_code_rms();
    std::vector<float> t(size_t(1) << kTrellisL);
    for (uint32_t s = 0; s < t.size(); ++s) t[s] = float(a[trellis256_index(s)] / rms);
    return t;
  }();
  return table.data();
}

const float* trellis_code_table(CodeFormat format) {
  return format == CodeFormat::kTrellis256 ? trellis256_code_table() : trellis_code_table();
}

const float* trellis_code_table() {
  static const std::vector<float> table = [] {
    const int size = 1 << kTrellisL;
    std::vector<double> q(size);
    double sq = 0.0;
    for (int p = 0; p < size; ++p) {
      q[p] = normal_quantile((p + 0.5) / size);
      sq += q[p] * q[p];
    }
    const double rms = std::sqrt(sq / size);
    std::vector<float> t(size);
    for (int s = 0; s < size; ++s) t[s] = float(q[state_hash(uint32_t(s))] / rms);
    return t;
  }();
  return table.data();
}

namespace trellis_scalar {

void gemv(const TrellisCodes& c, int i0, int i1, const float* z, int ldz, int nb, float* t, int ldt) {
  const float* code = c.code;
  uint32_t s[kTrellisTile];
  for (int i = i0; i < i1; ++i) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int C = 0; C < c.n / kTrellisTile; ++C) {
      trellis_row_states(c, i, C, s);
      for (int b = 0; b < nb; ++b) {
        const float* zb = z + size_t(b) * ldz + kTrellisTile * C;
        for (int j = 0; j < kTrellisTile; ++j) acc[b] += code[s[j]] * zb[j];
      }
    }
    for (int b = 0; b < nb; ++b) t[size_t(b) * ldt + i] = c.scale[i] * acc[b];
  }
}

void gemm(const TrellisCodes& c, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work) {
  const float* code = c.code;
  auto pack = [&](int p0, int rows, int k0, int klen, float* panel) {
    uint32_t s[kTrellisTile];
    for (int r = 0; r < kGemmNR; ++r) {
      if (r >= rows) {
        for (int k = 0; k < klen; ++k) panel[k * kGemmNR + r] = 0.f;
        continue;
      }
      const float sc = c.scale[p0 + r];
      for (int k = 0; k < klen; k += kTrellisTile) {
        trellis_row_states(c, p0 + r, (k0 + k) / kTrellisTile, s);
        for (int j = 0; j < kTrellisTile; ++j) panel[(k + j) * kGemmNR + r] = sc * code[s[j]];
      }
    }
  };
  gemm_panels<ScalarUkernel>(c.n, i0, i1, z, ldz, nbatch, t, ldt, work, pack);
}

}  // namespace trellis_scalar
}  // namespace quipc
