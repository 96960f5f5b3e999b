// AVX-512F twins of AVX2 kernels, taken at run time where the CPU has AVX-512F (compiled with
// -mavx512f; call only after cpu_has_avx512f()):
// - the 6x16 GEMM micro-kernel with the AVX2 one's packed layout (ukernel_avx2.h calls it): one
//   16-float panel row per zmm, two k steps in flight with their own 6 accumulators each (12
//   independent FMA chains, enough for two FMA ports), summed at the end;
// - the transforms' dense factors (gemm_f32): 16 columns a zmm, 12 rows at a time, each element
//   the AVX2 gemm_f32's FMA chain.
#include <immintrin.h>

#include <cstddef>

#include "kernels.h"
#include "ukernel_avx512.h"

namespace quipc {

void avx512_ukernel(int rows, int K, const float* A, const float* panel, float* C, int ldc,
                    bool accumulate, int cols) {
  __m512 c[2][kGemmMR];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < kGemmMR; ++r) c[h][r] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 2 <= K; k += 2) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512 b = _mm512_loadu_ps(panel + size_t(k + h) * kGemmNR);
      const float* a = A + size_t(k + h) * kGemmMR;
#pragma GCC unroll 6
      for (int r = 0; r < kGemmMR; ++r) c[h][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), b, c[h][r]);
    }
  }
  if (k < K) {
    const __m512 b = _mm512_loadu_ps(panel + size_t(k) * kGemmNR);
    const float* a = A + size_t(k) * kGemmMR;
#pragma GCC unroll 6
    for (int r = 0; r < kGemmMR; ++r) c[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), b, c[0][r]);
  }
  const __mmask16 mask = cols >= kGemmNR ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u);
  for (int r = 0; r < rows; ++r) {
    __m512 v = _mm512_add_ps(c[0][r], c[1][r]);
    float* cr = C + size_t(r) * ldc;
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, cr));
    _mm512_mask_storeu_ps(cr, mask, v);
  }
}

}  // namespace quipc

namespace quipc {
namespace {

// Rows i..i+R-1 of C, the 16 columns at j (mask: the valid ones): R accumulators, each B row
// loaded once for the R rows. Each element is the same FMA chain over k as the AVX2 gemm_f32's.
template <int R>
inline void rows16(int K, const float* A, int lda, const float* B, int ldb, int j, __mmask16 mask, float* C,
                   int ldc) {
  __m512 acc[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m512 b = _mm512_maskz_loadu_ps(mask, B + size_t(k) * ldb + j);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(A[size_t(r) * lda + k]), b, acc[r]);
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(C + size_t(r) * ldc + j, mask, acc[r]);
}

}  // namespace

void avx512_gemm_f32(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  for (int j = 0; j < N; j += 16) {
    const __mmask16 mask = N - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - j)) - 1u);
    int i = 0;
    for (; i + 12 <= M; i += 12) rows16<12>(K, A + size_t(i) * lda, lda, B, ldb, j, mask, C + size_t(i) * ldc, ldc);
    for (; i + 4 <= M; i += 4) rows16<4>(K, A + size_t(i) * lda, lda, B, ldb, j, mask, C + size_t(i) * ldc, ldc);
    for (; i < M; ++i) rows16<1>(K, A + size_t(i) * lda, lda, B, ldb, j, mask, C + size_t(i) * ldc, ldc);
  }
}

}  // namespace quipc
