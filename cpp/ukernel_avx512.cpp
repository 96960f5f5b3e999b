// 6x16 AVX-512F GEMM micro-kernel with the AVX2 one's packed layout (ukernel_avx2.h calls it
// where the CPU has AVX-512F): one 16-float panel row per zmm, two k steps in flight with their
// own 6 accumulators each (12 independent FMA chains, enough for two FMA ports), summed at the
// end. Compiled with -mavx512f; call only after cpu_has_avx512f().
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
