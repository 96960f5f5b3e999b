// The 4-bit GEMV on int8 activations (kernels.h: Int8Acts), AVX2. A block of 32 weights is 16
// code bytes: their low nibbles (even positions) and high nibbles (odd positions) make one
// 32-byte register of unsigned codes that vpmaddubsw multiplies by the block's 32 int8
// activations (stored evens then odds), vpmaddwd sums the pairs to 8 int32 lanes (exact:
// |sum| <= 2 * 15 * 127 per int16 lane), and one FMA adds them scaled by the block's step.
// Per 32 weights that is ~10 instructions against ~24 for the fp32 GEMV (gemv_avx2.cpp).
#include <immintrin.h>

#include <cstring>

#include "avx2.h"
#include "avx2_util.h"
#include "prefetch.h"

namespace quipc {
namespace avx2 {
namespace {

// The block's 32 codes (16 bytes at p): low nibbles in the low half, high nibbles in the high.
inline __m256i nibbles(const uint8_t* p) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), m4), _mm_and_si128(x, m4));
}

// Sum of codes * activations over a block, as 8 int32 lanes, converted to float.
inline __m256 block_dot(__m256i codes, __m256i acts) {
  const __m256i pairs = _mm256_maddubs_epi16(codes, acts);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// R rows x NB activation rows; the blocks of [0, full) are read in place, a partial last block
// (n not a multiple of 32) from a zero-padded copy so that the last row's read stays in bounds.
template <int R, int NB>
void rows_i8(const Codes& c, const RowAffine& aff, int i, const Int8Acts& a, const float* zsum,
             float* t, int ldt) {
  const int full = c.n / kActBlock;
  const size_t row_acts = size_t(a.blocks) * kActBlock;
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  int blk = 0;
  // Two blocks at a time: one 32-byte load holds 64 codes of a row; its low nibbles are the even
  // positions of both blocks (bytes 0-15 block one, 16-31 block two), its high nibbles the odd
  // ones, so the activations' even halves of the two blocks make one register, their odd
  // halves another (one lane swap per activation row, shared by the R rows); two vpmaddubsw
  // (int16 sums of two products <= 2 * 3810, no saturation), one vpaddw, one vpmaddwd: int32
  // lanes 0-3 of block one and 4-7 of block two, scaled by their steps in one FMA. Per 64
  // weights and row 10 instructions, against 18 for two single blocks.
  // Rows inside, activation rows innermost: a row's two code registers are live only while it
  // is read. The activations' registers are hoisted out of the rows where R > 1 (NB <= 2); with
  // every row's codes live at once (the loop order before), R = 4 needed 17 registers and
  // spilled an accumulator (a load and a store a step; ~5 % of the GEMV at SmolLM2's shapes).
  const __m256i m4 = _mm256_set1_epi8(15);
  for (; blk + 2 <= full; blk += 2) {
    auto acts_of = [&](int b, __m256i* evens, __m256i* odds, __m256* step) {
      const int8_t* q = a.q + size_t(b) * row_acts + size_t(blk) * kActBlock;
      const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + kActBlock));
      *evens = _mm256_permute2x128_si256(q0, q1, 0x20);
      *odds = _mm256_permute2x128_si256(q0, q1, 0x31);
      const float* d = a.d + size_t(b) * a.blocks + blk;
      *step = _mm256_setr_m128(_mm_set1_ps(d[0]), _mm_set1_ps(d[1]));
    };
    constexpr bool hoist = NB <= 2;
    __m256i ev[hoist ? NB : 1], od[hoist ? NB : 1];
    __m256 st[hoist ? NB : 1];
    if constexpr (hoist) {
#pragma GCC unroll 2
      for (int b = 0; b < NB; ++b) acts_of(b, &ev[b], &od[b], &st[b]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = c.data + size_t(i + r) * c.row_bytes + size_t(blk) * (kActBlock / 2);
      if ((blk & 3) == 0) prefetch_ahead(p);  // one per 64-byte line
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i lo = _mm256_and_si256(x, m4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        __m256i evens, odds;
        __m256 step;
        if constexpr (hoist) {
          evens = ev[b];
          odds = od[b];
          step = st[b];
        } else {
          acts_of(b, &evens, &odds, &step);
        }
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, evens),
                                               _mm256_maddubs_epi16(hi, odds));
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        acc[r][b] = _mm256_fmadd_ps(sums, step, acc[r][b]);
      }
    }
  }
  for (; blk < a.blocks; ++blk) {
    __m256i codes[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = c.data + size_t(i + r) * c.row_bytes + size_t(blk) * (kActBlock / 2);
      if (blk < full) {
        codes[r] = nibbles(p);
      } else {
        uint8_t tail[kActBlock / 2] = {};
        std::memcpy(tail, p, c.row_bytes - size_t(blk) * (kActBlock / 2));
        codes[r] = nibbles(tail);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m256i q = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(a.q + size_t(b) * row_acts + size_t(blk) * kActBlock));
      const __m256 step = _mm256_set1_ps(a.d[size_t(b) * a.blocks + blk]);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm256_fmadd_ps(block_dot(codes[r], q), step, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      t[size_t(b) * ldt + i + r] = aff.scale[i + r] * hsum(acc[r][b]) + aff.zero[i + r] * zsum[b];
}

template <int NB>
void by_rows(const Codes& c, const RowAffine& aff, int i0, int i1, const Int8Acts& a,
             const float* zsum, float* t, int ldt) {
  constexpr int R = NB == 1 ? 4 : NB == 2 ? 2 : 1;  // R * NB accumulators: enough FMAs in flight
  int i = i0;
  for (; i + R <= i1; i += R) rows_i8<R, NB>(c, aff, i, a, zsum, t, ldt);
  for (; i < i1; ++i) rows_i8<1, NB>(c, aff, i, a, zsum, t, ldt);
}

}  // namespace

void quantize_acts(const float* z, int n, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int blk = 0; blk * kActBlock < n; ++blk) {
    const float* zb = z + blk * kActBlock;
    if (n - blk * kActBlock < kActBlock) {  // a partial last block: its values past n are zero
      float tail[kActBlock] = {};
      std::memcpy(tail, zb, sizeof(float) * size_t(n - blk * kActBlock));
      quantize_acts(tail, kActBlock, q + blk * kActBlock, d + blk);
      return;
    }
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int u = 0; u < 4; ++u) {
      v[u] = _mm256_loadu_ps(zb + 8 * u);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[u]));
    }
    const float step = hmax(amax) / 127.f, inv = step > 0.f ? 1.f / step : 0.f;
    d[blk] = step;
    const __m256 s = _mm256_set1_ps(inv);
    // rounded int32 lanes of positions 0-7, 8-15, 16-23, 24-31, packed to int8 in position order
    __m256i w[4];
    for (int u = 0; u < 4; ++u) w[u] = _mm256_cvtps_epi32(_mm256_mul_ps(v[u], s));
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(w[0], w[1]), 0xD8);  // 0..15
    const __m256i x16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(w[2], w[3]), 0xD8);  // 16..31
    __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(w16, x16), 0xD8);        // 0..31
    // evens then odds: within each 128-bit lane gather even bytes low, odd bytes high, then
    // the 64-bit quarters in the order (evens 0-15, evens 16-31, odds 0-15, odds 16-31)
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, split), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + blk * kActBlock), bytes);
  }
}

void qgemv4_i8(const Codes& c, const RowAffine& aff, int i0, int i1, const Int8Acts& a,
               const float* zsum, int nb, float* t, int ldt) {
  switch (nb) {
    case 1: by_rows<1>(c, aff, i0, i1, a, zsum, t, ldt); break;
    case 2: by_rows<2>(c, aff, i0, i1, a, zsum, t, ldt); break;
    case 3: by_rows<3>(c, aff, i0, i1, a, zsum, t, ldt); break;
    default: by_rows<4>(c, aff, i0, i1, a, zsum, t, ldt); break;
  }
}

}  // namespace avx2
}  // namespace quipc
