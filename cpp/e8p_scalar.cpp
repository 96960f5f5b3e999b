// Format "e8p", portable kernels: the reference for e8p_avx2.cpp (forced with force_scalar
// or QUIPC_FORCE_SCALAR) and the path for CPUs without AVX2.
#include "e8p.h"
#include "gemm_driver.h"
#include "kernels.h"
#include "ukernel_scalar.h"

namespace quipc {
namespace e8p_scalar {
namespace {

// Signed source of index a (no shift) dotted with 8 activations.
inline float signed_dot(const E8PTables& T, uint32_t a, const float* z) {
  float p[8];
  e8p_signed_source(T, a, p);
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += p[j] * z[j];
  return s;
}

inline float shift_term(uint32_t a, float gsum) { return gsum - 2.f * gsum * float((a >> 15) & 1); }

}  // namespace

void gemv(const E8PCodes& c, int i0, int i1, const float* z, int ldz, const float* gsum, int nb,
          float* t, int ldt) {
  const E8PTables& T = e8p_tables();
  const int groups = c.n / 8, stages = e8p_stages(c.bits);
  for (int i = i0; i < i1; ++i) {
    const uint8_t* row = c.data + size_t(i) * c.row_bytes;
    for (int b = 0; b < nb; ++b) {
      const float* zb = z + size_t(b) * ldz;
      const float* gb = gsum + size_t(b) * groups;
      float acc0 = 0.f, acc1 = 0.f;
      for (int g = 0; g < groups; ++g) {
        const uint32_t a = e8p_first(row, c.bits, g);
        acc0 += signed_dot(T, a, zb + 8 * g) + shift_term(a, gb[g]);
        if (c.bits == 3) {
          const float* v = T.one_bit[e8p_second(row, c.bits, g)];
          for (int j = 0; j < 8; ++j) acc1 += v[j] * zb[8 * g + j];
        } else if (c.bits == 4) {
          const uint32_t s = e8p_second(row, c.bits, g);
          acc1 += signed_dot(T, s, zb + 8 * g) + shift_term(s, gb[g]);
        }
      }
      const float* sc = c.scale + size_t(i) * stages;
      t[size_t(b) * ldt + i] = stages == 1 ? sc[0] * acc0 : sc[0] * acc0 + sc[1] * acc1;
    }
  }
}

void gemm(const E8PCodes& c, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work) {
  const E8PTables& T = e8p_tables();
  const int stages = e8p_stages(c.bits);
  auto pack = [&](int p0, int rows, int k0, int klen, float* panel) {
    for (int r = 0; r < kGemmNR; ++r) {
      if (r >= rows) {
        for (int k = 0; k < klen; ++k) panel[k * kGemmNR + r] = 0.f;
        continue;
      }
      const uint8_t* row = c.data + size_t(p0 + r) * c.row_bytes;
      const float* sc = c.scale + size_t(p0 + r) * stages;
      for (int k = 0; k < klen; k += 8) {
        const int g = (k0 + k) / 8;
        float w[8], v[8];
        e8p_point(T, e8p_first(row, c.bits, g), w);
        for (int j = 0; j < 8; ++j) w[j] *= sc[0];
        if (c.bits == 3) {
          const float* ob = T.one_bit[e8p_second(row, c.bits, g)];
          for (int j = 0; j < 8; ++j) w[j] += sc[1] * ob[j];
        } else if (c.bits == 4) {
          e8p_point(T, e8p_second(row, c.bits, g), v);
          for (int j = 0; j < 8; ++j) w[j] += sc[1] * v[j];
        }
        for (int j = 0; j < 8; ++j) panel[(k + j) * kGemmNR + r] = w[j];
      }
    }
  };
  gemm_panels<ScalarUkernel>(c.n, i0, i1, z, ldz, nbatch, t, ldt, work, pack);
}

}  // namespace e8p_scalar
}  // namespace quipc
