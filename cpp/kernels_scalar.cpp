// Portable kernels: plain C++ that any x86-64 (or other) CPU runs. Also the reference
// for the AVX2 kernels in the tests (forced through force_scalar / QUIPC_FORCE_SCALAR).
#include <cmath>

#include "e8p.h"
#include "gemm_driver.h"
#include "int8_rows.h"
#include "row_tiles_kernels.h"
#include "kernels.h"
#include "ukernel_scalar.h"
#include "unpack.h"
#include "trellis.h"

namespace quipc {
namespace {

void qgemv_scalar(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z, int ldz,
                  const float* zsum, int nb, float* t, int ldt) {
  const uint32_t mask = (1u << c.bits) - 1;
  const int groups = (c.n + 7) / 8;
  for (int i = i0; i < i1; ++i) {
    const uint8_t* row = c.data + size_t(i) * c.row_bytes;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < groups; ++g) {
      const uint32_t w = load_group(row + size_t(g) * c.bits, c.bits);
      const int cnt = c.n - g * 8 < 8 ? c.n - g * 8 : 8;
      for (int u = 0; u < cnt; ++u) {
        const float code = float((w >> (c.bits * u)) & mask);
        for (int b = 0; b < nb; ++b) acc[b] += code * z[size_t(b) * ldz + g * 8 + u];
      }
    }
    for (int b = 0; b < nb; ++b) t[size_t(b) * ldt + i] = aff.scale[i] * acc[b] + aff.zero[i] * zsum[b];
  }
}

void quantize_acts_scalar(const float* z, int n, int8_t* q, float* d) {
  for (int blk = 0; blk * kActBlock < n; ++blk) {
    const int len = n - blk * kActBlock < kActBlock ? n - blk * kActBlock : kActBlock;
    const float* zb = z + blk * kActBlock;
    float amax = 0.f;
    for (int j = 0; j < len; ++j) amax = std::fmax(amax, std::fabs(zb[j]));
    const float step = amax / 127.f, inv = step > 0.f ? 1.f / step : 0.f;
    d[blk] = step;
    int8_t* qb = q + blk * kActBlock;
    for (int j = 0; j < kActBlock; ++j) {  // position j goes to slot j / 2 (even) or 16 + j / 2 (odd)
      const float v = j < len ? zb[j] * inv : 0.f;
      qb[(j & 1) * (kActBlock / 2) + j / 2] = int8_t(std::nearbyint(v));
    }
  }
}

void qgemv4_i8_scalar(const Codes& c, const RowAffine& aff, int i0, int i1, const Int8Acts& a,
                      const float* zsum, int nb, float* t, int ldt) {
  const int row_acts = a.blocks * kActBlock;
  for (int i = i0; i < i1; ++i) {
    const uint8_t* row = c.data + size_t(i) * c.row_bytes;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int blk = 0; blk < a.blocks; ++blk) {
      const int len = c.n - blk * kActBlock < kActBlock ? c.n - blk * kActBlock : kActBlock;
      for (int b = 0; b < nb; ++b) {
        const int8_t* qb = a.q + size_t(b) * row_acts + blk * kActBlock;
        int32_t dot = 0;
        for (int j = 0; j < len; ++j)
          dot += code_at(row, 4, blk * kActBlock + j) * qb[(j & 1) * (kActBlock / 2) + j / 2];
        acc[b] += a.d[size_t(b) * a.blocks + blk] * float(dot);
      }
    }
    for (int b = 0; b < nb; ++b) t[size_t(b) * ldt + i] = aff.scale[i] * acc[b] + aff.zero[i] * zsum[b];
  }
}

void qgemm_scalar(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z, int ldz,
                  const float* zsum, int nb, float* t, int ldt, float* work) {
  qgemm_driver<ScalarUkernel>(c, aff, i0, i1, z, ldz, zsum, nb, t, ldt, work);
}

void fwht_scalar(float* x, int pre, int f, int post) { fwht_generic(x, pre, f, post); }

void gemm_f32_scalar(int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                     float* C, int ldc) {
  for (int i = 0; i < M; ++i) {
    float* c = C + size_t(i) * ldc;
    for (int j = 0; j < N; ++j) c[j] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float a = A[size_t(i) * lda + k];
      const float* b = B + size_t(k) * ldb;
      for (int j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

}  // namespace

const KernelTable& scalar_kernels() {
  static const KernelTable table{"scalar",    qgemv_scalar,    quantize_acts_scalar, qgemv4_i8_scalar, qgemm_scalar,
                                 fwht_scalar, gemm_f32_scalar, e8p_scalar::gemv,
                                 e8p_scalar::gemm, trellis_scalar::gemv,
                                 trellis_scalar::gemm, int8_rows_scalar::gemv,
                                 int8_rows_scalar::gemv_i8, row_tiles_scalar::gemv4_i8,
                                 row_tiles_scalar::gemv8_i8};
  return table;
}

}  // namespace quipc
