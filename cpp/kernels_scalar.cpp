// Portable kernels: plain C++ that any x86-64 (or other) CPU runs. Also the reference
// for the AVX2 kernels in the tests (forced through force_scalar / QUIPC_FORCE_SCALAR).
#include "e8p.h"
#include "gemm_driver.h"
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
  static const KernelTable table{"scalar",    qgemv_scalar,    qgemm_scalar,
                                 fwht_scalar, gemm_f32_scalar, e8p_scalar::gemv,
                                 e8p_scalar::gemm, trellis_scalar::gemv,
                                 trellis_scalar::gemm};
  return table;
}

}  // namespace quipc
