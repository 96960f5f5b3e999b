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

// The generic loop's butterflies are contiguous runs of h*post floats, which vectorize once
// h*post >= 8. On the last axis (post == 1) the spans 1, 2, 4 run in registers instead, and
// the rest is the generic loop on the (pre, f/8, 8) view.
void fwht(float* x, int pre, int f, int post) {
  if (post != 1 || f < 8) return fwht_generic(x, pre, f, post);
  for (size_t j = 0; j < size_t(pre) * f; j += 8) {
    __m256 r = _mm256_loadu_ps(x + j);
    r = butterfly_in_register<1>(r);
    r = butterfly_in_register<2>(r);
    r = butterfly_in_register<4>(r);
    _mm256_storeu_ps(x + j, r);
  }
  fwht_generic(x, pre, f / 8, 8);
}

namespace {

// Rows i, i+1 of C, columns [j, j + 8*NV): 2*NV accumulators, each B load used twice.
template <int NV>
inline void two_rows(int K, const float* a0, const float* a1, const float* B, int ldb, int j,
                     float* c0, float* c1) {
  __m256 x[NV], y[NV];
  for (int v = 0; v < NV; ++v) x[v] = y[v] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m256 s0 = _mm256_broadcast_ss(a0 + k), s1 = _mm256_broadcast_ss(a1 + k);
    const float* b = B + size_t(k) * ldb + j;
    for (int v = 0; v < NV; ++v) {
      const __m256 bv = _mm256_loadu_ps(b + 8 * v);
      x[v] = _mm256_fmadd_ps(s0, bv, x[v]);
      y[v] = _mm256_fmadd_ps(s1, bv, y[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    _mm256_storeu_ps(c0 + j + 8 * v, x[v]);
    _mm256_storeu_ps(c1 + j + 8 * v, y[v]);
  }
}

}  // namespace

// C = A * B, vectorized along N: rows in pairs, 32 (then 16, 8) columns at a time.
void gemm_f32(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
              int ldc) {
  int i = 0;
  for (; i + 2 <= M; i += 2) {
    const float* a0 = A + size_t(i) * lda;
    const float* a1 = a0 + lda;
    float* c0 = C + size_t(i) * ldc;
    float* c1 = c0 + ldc;
    int j = 0;
    for (; j + 32 <= N; j += 32) two_rows<4>(K, a0, a1, B, ldb, j, c0, c1);
    for (; j + 16 <= N; j += 16) two_rows<2>(K, a0, a1, B, ldb, j, c0, c1);  // e.g. 576 = 36 x 16
    for (; j + 8 <= N; j += 8) two_rows<1>(K, a0, a1, B, ldb, j, c0, c1);
    for (; j < N; ++j) {
      float s0 = 0.f, s1 = 0.f;
      for (int k = 0; k < K; ++k) {
        s0 += a0[k] * B[size_t(k) * ldb + j];
        s1 += a1[k] * B[size_t(k) * ldb + j];
      }
      c0[j] = s0;
      c1[j] = s1;
    }
  }
  for (; i < M; ++i) {  // last odd row
    const float* a = A + size_t(i) * lda;
    float* c = C + size_t(i) * ldc;
    int j = 0;
    for (; j + 8 <= N; j += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int k = 0; k < K; ++k)
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(a + k), _mm256_loadu_ps(B + size_t(k) * ldb + j),
                              acc);
      _mm256_storeu_ps(c + j, acc);
    }
    for (; j < N; ++j) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += a[k] * B[size_t(k) * ldb + j];
      c[j] = s;
    }
  }
}

}  // namespace avx2
}  // namespace quipc
