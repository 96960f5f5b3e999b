// AVX2 pieces of the incoherence transforms: the Walsh-Hadamard butterflies (the generic
// loop, auto-vectorized here with AVX2) and the small dense products used for the
// non-power-of-two Hadamard factor and the Kronecker factors.
#include <immintrin.h>

#include "avx2.h"
#include "gemm_driver.h"

namespace quipc {
namespace avx2 {

namespace {

// One butterfly stage of span H < 8 inside an 8-lane register: lanes with bit H clear get
// v + partner, the others partner - v (the partner is the lane H away).
template <int H>
inline __m256 butterfly_in_register(__m256 v) {
  const __m256 partner = H == 4 ? _mm256_permute2f128_ps(v, v, 1)
                         : H == 2 ? _mm256_permute_ps(v, 0x4E)
                                  : _mm256_permute_ps(v, 0xB1);
  constexpr int kDiffLanes = H == 4 ? 0xF0 : H == 2 ? 0xCC : 0xAA;
  return _mm256_blend_ps(_mm256_add_ps(v, partner), _mm256_sub_ps(partner, v), kDiffLanes);
}

}  // namespace

// On the last axis (post == 1) the spans 1, 2, 4 run inside 8-lane registers and the spans
// from 8 up as whole-register butterflies, two spans a pass; other views are the generic loop's contiguous runs
// of h*post floats (vectorized by the compiler once h*post >= 8, behind its aliasing checks,
// which cost more than the butterflies at the transforms' sizes: a 16-wide factor's rows).
void fwht(float* x, int pre, int f, int post) {
  if (post != 1 || f < 8) return fwht_generic(x, pre, f, post);
  if (f == 16) {  // the transforms' usual factor: a row's two registers, one load and store each
    for (int p = 0; p < pre; ++p) {
      float* v = x + size_t(p) * 16;
      __m256 a = _mm256_loadu_ps(v), b = _mm256_loadu_ps(v + 8);
      a = butterfly_in_register<4>(butterfly_in_register<2>(butterfly_in_register<1>(a)));
      b = butterfly_in_register<4>(butterfly_in_register<2>(butterfly_in_register<1>(b)));
      _mm256_storeu_ps(v, _mm256_add_ps(a, b));
      _mm256_storeu_ps(v + 8, _mm256_sub_ps(a, b));
    }
    return;
  }
  for (size_t j = 0; j < size_t(pre) * f; j += 8) {
    __m256 r = _mm256_loadu_ps(x + j);
    r = butterfly_in_register<1>(r);
    r = butterfly_in_register<2>(r);
    r = butterfly_in_register<4>(r);
    _mm256_storeu_ps(x + j, r);
  }
  for (int p = 0; p < pre; ++p) {
    float* v = x + size_t(p) * f;
    int h = 8;
    for (; 4 * h <= f; h *= 4)  // the spans h and 2h in one pass: the same sums, half the loads
      for (int base = 0; base < f; base += 4 * h)
        for (int k = base; k < base + h; k += 8) {
          const __m256 a = _mm256_loadu_ps(v + k), b = _mm256_loadu_ps(v + k + h);
          const __m256 c = _mm256_loadu_ps(v + k + 2 * h), d = _mm256_loadu_ps(v + k + 3 * h);
          const __m256 s1 = _mm256_add_ps(a, b), d1 = _mm256_sub_ps(a, b);
          const __m256 s2 = _mm256_add_ps(c, d), d2 = _mm256_sub_ps(c, d);
          _mm256_storeu_ps(v + k, _mm256_add_ps(s1, s2));
          _mm256_storeu_ps(v + k + h, _mm256_add_ps(d1, d2));
          _mm256_storeu_ps(v + k + 2 * h, _mm256_sub_ps(s1, s2));
          _mm256_storeu_ps(v + k + 3 * h, _mm256_sub_ps(d1, d2));
        }
    if (h < f)  // one span left
      for (int k = 0; k < h; k += 8) {
        const __m256 a = _mm256_loadu_ps(v + k), b = _mm256_loadu_ps(v + k + h);
        _mm256_storeu_ps(v + k, _mm256_add_ps(a, b));
        _mm256_storeu_ps(v + k + h, _mm256_sub_ps(a, b));
      }
  }
}

namespace {

// Rows i..i+R-1 of C, columns [j, j + 8*NV): R*NV accumulators, each B load used R times.
// Every element is the same FMA chain over k whatever R and NV are (results do not depend
// on the blocking). The accumulators are one flat array with its loops unrolled: GCC 12 kept a
// two-dimensional one on the stack, storing every accumulator on every k.
template <int R, int NV>
inline void row_block(int K, const float* A, int lda, const float* B, int ldb, int j, float* C,
                      int ldc) {
  __m256 acc[R * NV];
#pragma GCC unroll 16
  for (int u = 0; u < R * NV; ++u) acc[u] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = B + size_t(k) * ldb + j;
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_broadcast_ss(A + size_t(r) * lda + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm256_fmadd_ps(s, bv[v], acc[r * NV + v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + size_t(r) * ldc + j + 8 * v, acc[r * NV + v]);
}

// R rows of C (R <= 4): 8 accumulators where the columns allow (a chain of K dependent FMAs
// per accumulator: the transforms' small factors, e.g. 576 = 36 x 16, are latency-bound with
// fewer), the columns left past a multiple of 8 one by one, by the same FMA chain (so that
// every element equals the AVX-512F gemm's, ukernel_avx512.h).
template <int R>
void rows_of(int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  constexpr int NV = R >= 4 ? 2 : R == 2 ? 4 : 1;
  int j = 0;
  for (; j + 8 * NV <= N; j += 8 * NV) row_block<R, NV>(K, A, lda, B, ldb, j, C, ldc);
  for (; j + 8 <= N; j += 8) row_block<R, 1>(K, A, lda, B, ldb, j, C, ldc);
  for (; j < N; ++j)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s = __builtin_fmaf(A[size_t(r) * lda + k], B[size_t(k) * ldb + j], s);
      C[size_t(r) * ldc + j] = s;
    }
}

}  // namespace

// C = A * B, vectorized along N: rows four at a time, then a pair, then one.
void gemm_f32(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
              int ldc) {
  int i = 0;
  for (; i + 4 <= M; i += 4) rows_of<4>(N, K, A + size_t(i) * lda, lda, B, ldb, C + size_t(i) * ldc, ldc);
  for (; i + 2 <= M; i += 2) rows_of<2>(N, K, A + size_t(i) * lda, lda, B, ldb, C + size_t(i) * ldc, ldc);
  for (; i < M; ++i) rows_of<1>(N, K, A + size_t(i) * lda, lda, B, ldb, C + size_t(i) * ldc, ldc);
}

}  // namespace avx2
}  // namespace quipc
