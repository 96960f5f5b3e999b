// AVX2+FMA kernels (compiled with -mavx2 -mfma; call only after cpu_has_avx2_fma()).
#pragma once
#include "kernels.h"

namespace quipc {
namespace avx2 {
void qgemv(const Codes&, const RowAffine&, int i0, int i1, const float* z, int ldz,
           const float* zsum, int nb, float* t, int ldt);
void quantize_acts(const float* z, int n, int8_t* q, float* d);
void qgemv4_i8(const Codes&, const RowAffine&, int i0, int i1, const Int8Acts& a, const float* zsum,
               int nb, float* t, int ldt);
void qgemm(const Codes&, const RowAffine&, int i0, int i1, const float* z, int ldz,
           const float* zsum, int nbatch, float* t, int ldt, float* work);
void fwht(float* x, int pre, int f, int post);
void gemm_f32(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
              int ldc);
}  // namespace avx2
}  // namespace quipc
