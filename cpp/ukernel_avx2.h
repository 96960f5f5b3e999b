// 6x16 AVX2/FMA GEMM micro-kernel for gemm_driver.h (12 accumulators, 2 panel loads and
// 6 broadcasts per k, all from contiguous packed streams). Include only from -mavx2 units.
#pragma once
#include <immintrin.h>

#include <cstddef>

#include "kernels.h"
#include "ukernel_avx512.h"

namespace quipc {
namespace avx2 {
namespace {

inline void store_row(float* cr, __m256 lo, __m256 hi, bool accumulate, int cols) {
  if (cols == kGemmNR) {
    if (accumulate) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(cr));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(cr + 8));
    }
    _mm256_storeu_ps(cr, lo);
    _mm256_storeu_ps(cr + 8, hi);
    return;
  }
  alignas(32) float tmp[kGemmNR];  // right edge of the output
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  for (int j = 0; j < cols; ++j) cr[j] = accumulate ? cr[j] + tmp[j] : tmp[j];
}

// Always computes 6 rows (the packed activations are zero past the batch) and stores
// `rows`. Named accumulators: with arrays GCC keeps a memory copy updated every k.
struct Avx2Ukernel {
  static void run(int rows, int K, const float* A, const float* panel, float* C, int ldc,
                  bool accumulate, int cols) {
    static const bool wide = cpu_has_avx512f();   // 16 lanes per FMA: 10-30 % less GEMM time here
    if (wide) return avx512_ukernel(rows, K, A, panel, C, ldc, accumulate, cols);
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_load_ps(panel + k * kGemmNR);
      const __m256 b1 = _mm256_load_ps(panel + k * kGemmNR + 8);
      const float* a = A + k * kGemmMR;
      __m256 av = _mm256_broadcast_ss(a);
      c00 = _mm256_fmadd_ps(av, b0, c00);
      c01 = _mm256_fmadd_ps(av, b1, c01);
      av = _mm256_broadcast_ss(a + 1);
      c10 = _mm256_fmadd_ps(av, b0, c10);
      c11 = _mm256_fmadd_ps(av, b1, c11);
      av = _mm256_broadcast_ss(a + 2);
      c20 = _mm256_fmadd_ps(av, b0, c20);
      c21 = _mm256_fmadd_ps(av, b1, c21);
      av = _mm256_broadcast_ss(a + 3);
      c30 = _mm256_fmadd_ps(av, b0, c30);
      c31 = _mm256_fmadd_ps(av, b1, c31);
      av = _mm256_broadcast_ss(a + 4);
      c40 = _mm256_fmadd_ps(av, b0, c40);
      c41 = _mm256_fmadd_ps(av, b1, c41);
      av = _mm256_broadcast_ss(a + 5);
      c50 = _mm256_fmadd_ps(av, b0, c50);
      c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    const __m256 lo[kGemmMR] = {c00, c10, c20, c30, c40, c50};
    const __m256 hi[kGemmMR] = {c01, c11, c21, c31, c41, c51};
    for (int r = 0; r < rows; ++r) store_row(C + size_t(r) * ldc, lo[r], hi[r], accumulate, cols);
  }
};

}  // namespace
}  // namespace avx2
}  // namespace quipc
