// AVX2 step functions of the trellis encoder (cpp/trellis.h); built with -mavx2 and
// -ffp-contract=off: the same multiply, then add, as the scalar reference and numpy.
#include <immintrin.h>

#include "trellis.h"

namespace quipc {
namespace {

// 32 groups at a time: the minimum over the K predecessors and the first top reaching it,
// the four arg vectors narrowed to 32 bytes in order.
void min_predecessors(const float* cost, int G, int K, float* best, uint8_t* back) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int j = 0; j < G; j += 32) {
    __m256 b[4];
    __m256i a[4];
    for (int q = 0; q < 4; ++q) {
      b[q] = _mm256_loadu_ps(cost + j + 8 * q);
      a[q] = _mm256_setzero_si256();
    }
    for (int top = 1; top < K; ++top) {
      const float* c = cost + size_t(top) * G + j;
      const __m256i t = _mm256_set1_epi32(top);
      for (int q = 0; q < 4; ++q) {
        const __m256 v = _mm256_loadu_ps(c + 8 * q);
        const __m256 lower = _mm256_cmp_ps(v, b[q], _CMP_LT_OQ);
        b[q] = _mm256_blendv_ps(b[q], v, lower);
        a[q] = _mm256_blendv_epi8(a[q], t, _mm256_castps_si256(lower));
      }
    }
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(best + j + 8 * q, b[q]);
    const __m256i words = _mm256_packus_epi16(_mm256_packs_epi32(a[0], a[1]), _mm256_packs_epi32(a[2], a[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(back + j), _mm256_permutevar8x32_epi32(words, order));
  }
}

inline __m256 branch(__m256 best, const float* table, __m256 xt) {
  const __m256 d = _mm256_sub_ps(xt, _mm256_loadu_ps(table));
  return _mm256_add_ps(best, _mm256_mul_ps(d, d));
}

void add_branch(const float* best, const float* table, float xt, int G, int K, float* next) {
  const __m256 x = _mm256_set1_ps(xt);
  if (K == 4) {  // 8 groups -> 32 states: each best spread over its 4 states
    const __m256i lo = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i step = _mm256_set1_epi32(2);
    for (int j = 0; j < G; j += 8) {
      const __m256 b8 = _mm256_loadu_ps(best + j);
      __m256i idx = lo;
      for (int q = 0; q < 4; ++q, idx = _mm256_add_epi32(idx, step)) {
        const int s = 4 * j + 8 * q;
        _mm256_storeu_ps(next + s, branch(_mm256_permutevar8x32_ps(b8, idx), table + s, x));
      }
    }
    return;
  }
  for (int j = 0; j < G; ++j) {  // K = 8 or 16: one broadcast per group
    const __m256 b = _mm256_set1_ps(best[j]);
    for (int s = j * K; s < (j + 1) * K; s += 8) _mm256_storeu_ps(next + s, branch(b, table + s, x));
  }
}

}  // namespace

const TrellisStep& trellis_step_avx2() {
  static const TrellisStep step{min_predecessors, add_branch};
  return step;
}

}  // namespace quipc
