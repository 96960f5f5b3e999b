#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "attention.h"
#include "avx2_util.h"

namespace quipc {

namespace {

// e^x for x <= 0 (a softmax's shifted scores): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p
// Taylor to degree 6 (relative error ~2e-7); x below -87 gives 0 as expf underflows to.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   // ln2's high part, exact in n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);      // its low part
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float dot(const float* a, const float* b, int d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int j = 0;
  for (; j + 16 <= d; j += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
  }
  for (; j + 8 <= d; j += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
  float acc = hsum(_mm256_add_ps(s0, s1));
  for (; j < d; ++j) acc += a[j] * b[j];
  return acc;
}

}  // namespace

void attend_head_avx2(const float* q, const float* K, const float* V, int len, int d, float scale,
                      float softcap, float* scores, float* out) {
  float mx = -INFINITY;
  for (int t = 0; t < len; ++t) {
    const float s = dot(q, K + size_t(t) * d, d) * scale;
    scores[t] = softcap > 0.f ? soft_cap(s, softcap) : s;
    mx = std::max(mx, scores[t]);
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int t = 0;
  for (; t + 8 <= len; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vmx));
    _mm256_storeu_ps(scores + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; t < len; ++t) sum += (scores[t] = std::exp(scores[t] - mx));
  const float inv = 1.f / sum;
  std::fill(out, out + d, 0.f);
  for (t = 0; t < len; ++t) {
    const __m256 p = _mm256_set1_ps(scores[t] * inv);
    const float* vt = V + size_t(t) * d;
    int j = 0;
    for (; j + 8 <= d; j += 8)
      _mm256_storeu_ps(out + j, _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + j), _mm256_loadu_ps(out + j)));
    for (; j < d; ++j) out[j] += scores[t] * inv * vt[j];
  }
}

}  // namespace quipc
