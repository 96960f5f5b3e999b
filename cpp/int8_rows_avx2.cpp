// Int8 rows, AVX2 (compiled with -mavx2 -mfma). fp32 activations: per 8 weights of a row one
// sign-extending load, one conversion and one FMA against z in block order. Int8 activations
// (llama.cpp's Q8_0 x Q8_0 dot): vpmaddubsw takes unsigned x signed bytes, so a block's |q| meets
// its activations with q's signs moved onto them (vpsignb); products are <= 127 * 127 and pairs
// <= 32258, no saturation; vpmaddwd sums to 8 int32 lanes, one FMA scales them by the block's step.
#include <immintrin.h>

#include "avx2_util.h"
#include "int8_rows.h"
#include "prefetch.h"

namespace quipc {
namespace int8_rows_avx2 {
namespace {

template <int R, int NB>
void rows_f32(const Int8Rows& w, int i, const float* zp, int ldz, float* t, int ldt) {
  const size_t len = size_t(w.blocks) * kActBlock;
  __m256 acc[2][R][NB];  // two banks (even / odd 8-weight steps): 2 R NB FMA chains in flight
  for (int k = 0; k < 2; ++k)
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[k][r][b] = _mm256_setzero_ps();
  for (size_t j = 0; j < len; j += 16) {
    for (int k = 0; k < 2; ++k) {
      __m256 z[NB];
      for (int b = 0; b < NB; ++b) z[b] = _mm256_loadu_ps(zp + size_t(b) * ldz + j + 8 * k);
      for (int r = 0; r < R; ++r) {
        const int8_t* q = w.q + size_t(i + r) * len + j + 8 * k;
        if (k == 0 && (j & 63) == 0) prefetch_ahead(q);
        const __m256 v = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
        for (int b = 0; b < NB; ++b) acc[k][r][b] = _mm256_fmadd_ps(v, z[b], acc[k][r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      t[size_t(b) * ldt + i + r] = w.step[i + r] * hsum(_mm256_add_ps(acc[0][r][b], acc[1][r][b]));
}

template <int R, int NB>
void rows_i8(const Int8Rows& w, int i, const Int8Acts& a, float* t, int ldt) {
  const size_t len = size_t(w.blocks) * kActBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  // Rows inside, activation rows innermost, the activations hoisted out of the rows where
  // R > 1 (gemv_i8_avx2.cpp: every row's weights live at once spilled an accumulator).
  for (int blk = 0; blk < w.blocks; ++blk) {
    auto acts_of = [&](int b, __m256i* x, __m256* d) {
      *x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + size_t(b) * len + size_t(blk) * kActBlock));
      *d = _mm256_set1_ps(a.d[size_t(b) * a.blocks + blk]);
    };
    constexpr bool hoist = NB <= 2;
    __m256i xs[hoist ? NB : 1];
    __m256 ds[hoist ? NB : 1];
    if constexpr (hoist) {
#pragma GCC unroll 2
      for (int b = 0; b < NB; ++b) acts_of(b, &xs[b], &ds[b]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int8_t* qp = w.q + size_t(i + r) * len + size_t(blk) * kActBlock;
      if ((blk & 1) == 0) prefetch_ahead(qp);  // one per 64-byte line
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp));
      const __m256i mag = _mm256_abs_epi8(q);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        __m256i x;
        __m256 d;
        if constexpr (hoist) {
          x = xs[b];
          d = ds[b];
        } else {
          acts_of(b, &x, &d);
        }
        const __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(x, q));
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[r][b] = _mm256_fmadd_ps(sums, d, acc[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) t[size_t(b) * ldt + i + r] = w.step[i + r] * hsum(acc[r][b]);
}

// rows(R, NB, i) for R rows from i at a time over [i0, i1), then single rows, at NB = nb (<= 4):
// R * NB accumulators per bank, enough FMAs in flight and few enough registers.
// (An own constant type, not std::integral_constant: this unit instantiates no std template.)
template <int V>
struct Const {
  static constexpr int value = V;
};

template <class Rows>
void over_rows(int i0, int i1, int nb, Rows&& rows) {
  auto run = [&](auto NB) {
    constexpr int R = decltype(NB)::value == 1 ? 4 : decltype(NB)::value == 2 ? 2 : 1;
    int i = i0;
    for (; i + R <= i1; i += R) rows(Const<R>{}, NB, i);
    for (; i < i1; ++i) rows(Const<1>{}, NB, i);
  };
  switch (nb) {
    case 1: run(Const<1>{}); break;
    case 2: run(Const<2>{}); break;
    case 3: run(Const<3>{}); break;
    default: run(Const<4>{}); break;
  }
}

}  // namespace

void gemv(const Int8Rows& w, int i0, int i1, const float* zp, int ldz, int nb, float* t, int ldt) {
  over_rows(i0, i1, nb, [&](auto R, auto NB, int i) {
    rows_f32<decltype(R)::value, decltype(NB)::value>(w, i, zp, ldz, t, ldt);
  });
}

void gemv_i8(const Int8Rows& w, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt) {
  over_rows(i0, i1, nb, [&](auto R, auto NB, int i) {
    rows_i8<decltype(R)::value, decltype(NB)::value>(w, i, a, t, ldt);
  });
}

}  // namespace int8_rows_avx2
}  // namespace quipc
