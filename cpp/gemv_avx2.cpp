// Fused dequantize + GEMV for 1..4 activation vectors (decode). Each group of 8 codes is
// broadcast to the 8 lanes, shifted per lane (vpsrlvd), masked and converted: the codes
// are multiplied as small exact integers and the per-row scale/zero applied once at the
// end (t = scale * (c . z) + zero * sum(z)), so no dequantized weight is ever stored.
#include <immintrin.h>

#include <cstring>

#include "avx2.h"
#include "unpack.h"
#include "avx2_util.h"
#include "prefetch.h"

namespace quipc {
namespace avx2 {
namespace {

template <int BITS>
inline uint32_t load_word(const uint8_t* g) {  // may read past the group for 2/3 bits
  uint32_t w;
  std::memcpy(&w, g, 4);
  return w;
}

template <int BITS>
inline __m256 codes8(uint32_t w, __m256i shifts, __m256i mask) {
  const __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w)), shifts), mask);
  return _mm256_cvtepi32_ps(v);
}

template <int BITS, int NB>
void rows_kernel(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z, int ldz,
                 const float* zsum, float* t, int ldt) {
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                           6 * BITS, 7 * BITS);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const int groups = (c.n + 7) / 8;
  // 4-byte loads of a group read up to 4-BITS bytes of the next group: the last group
  // of each row is read exactly (load_group) so the buffer end is never crossed.
  const int fast = BITS == 4 ? groups : groups - 1;
  const int fast4 = fast & ~3;
  for (int i = i0; i < i1; ++i) {
    const uint8_t* row = c.data + size_t(i) * c.row_bytes;
    __m256 acc[NB][4];
    for (int b = 0; b < NB; ++b)
      for (int u = 0; u < 4; ++u) acc[b][u] = _mm256_setzero_ps();
    int g = 0;
    for (; g < fast4; g += 4) {
      if (((g * BITS) & 63) < 4 * BITS) prefetch_ahead(row + g * BITS);  // once per 64-byte line
      for (int u = 0; u < 4; ++u) {
        const __m256 w = codes8<BITS>(load_word<BITS>(row + (g + u) * BITS), shifts, mask);
        for (int b = 0; b < NB; ++b)
          acc[b][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(z + size_t(b) * ldz + (g + u) * 8),
                                      acc[b][u]);
      }
    }
    for (; g < groups; ++g) {
      const uint32_t word = g < fast ? load_word<BITS>(row + g * BITS)
                                     : load_group(row + g * BITS, BITS);
      const __m256 w = codes8<BITS>(word, shifts, mask);
      for (int b = 0; b < NB; ++b)
        acc[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(z + size_t(b) * ldz + g * 8), acc[b][0]);
    }
    for (int b = 0; b < NB; ++b) {
      const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[b][0], acc[b][1]),
                                     _mm256_add_ps(acc[b][2], acc[b][3]));
      t[size_t(b) * ldt + i] = aff.scale[i] * hsum(s) + aff.zero[i] * zsum[b];
    }
  }
}

// Decode fast path (one activation vector, 2 or 3 bits): two rows at a time share each
// activation load, and the code -> float step is a table lookup (vpermps reads only the low
// 3 bits of each lane's shifted word, so no mask and no int->float conversion is needed).
// 2 bits: one 32-bit load covers 16 codes; 3 bits: one group per load.
template <int BITS>
inline __m256 lookup(__m256 table, uint32_t word, __m256i shifts) {
  return _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts));
}

template <int BITS>
void rows_lookup(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z,
                 const float* zsum, float* t) {
  const __m256 table = BITS == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3)
                                 : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sh_lo = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                          6 * BITS, 7 * BITS);
  const __m256i sh_hi = _mm256_add_epi32(sh_lo, _mm256_set1_epi32(16));  // 2 bits: codes 8..15
  const int groups = (c.n + 7) / 8;
  // Each step covers 2 groups with 2 independent accumulators per row (FMA latency).
  // Word loads read 4 bytes (past the group for 2 and 3 bits): the groups from `fast` on,
  // which include the last one of the row, are read exactly.
  const int fast = (groups - 1) / 2 * 2;
  auto word_at = [&](const uint8_t* row, int g) {
    uint32_t w;
    std::memcpy(&w, row + size_t(g) * BITS, 4);
    return w;
  };
  int i = i0;
  for (; i + 2 <= i1; i += 2) {
    const uint8_t* r0 = c.data + size_t(i) * c.row_bytes;
    const uint8_t* r1 = r0 + c.row_bytes;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int g = 0;
    for (; g < fast; g += 2) {
      const __m256 zl = _mm256_loadu_ps(z + g * 8);
      const __m256 zh = _mm256_loadu_ps(z + g * 8 + 8);
      if (BITS == 2) {  // one word = 16 codes
        const uint32_t w0 = word_at(r0, g), w1 = word_at(r1, g);
        a0 = _mm256_fmadd_ps(lookup<BITS>(table, w0, sh_lo), zl, a0);
        b0 = _mm256_fmadd_ps(lookup<BITS>(table, w1, sh_lo), zl, b0);
        a1 = _mm256_fmadd_ps(lookup<BITS>(table, w0, sh_hi), zh, a1);
        b1 = _mm256_fmadd_ps(lookup<BITS>(table, w1, sh_hi), zh, b1);
      } else {  // one word per group of 8 codes
        a0 = _mm256_fmadd_ps(lookup<BITS>(table, word_at(r0, g), sh_lo), zl, a0);
        b0 = _mm256_fmadd_ps(lookup<BITS>(table, word_at(r1, g), sh_lo), zl, b0);
        a1 = _mm256_fmadd_ps(lookup<BITS>(table, word_at(r0, g + 1), sh_lo), zh, a1);
        b1 = _mm256_fmadd_ps(lookup<BITS>(table, word_at(r1, g + 1), sh_lo), zh, b1);
      }
    }
    for (; g < groups; ++g) {  // exact reads at the end of the rows
      const __m256 zl = _mm256_loadu_ps(z + g * 8);
      a1 = _mm256_fmadd_ps(lookup<BITS>(table, load_group(r0 + g * BITS, BITS), sh_lo), zl, a1);
      b1 = _mm256_fmadd_ps(lookup<BITS>(table, load_group(r1 + g * BITS, BITS), sh_lo), zl, b1);
    }
    t[i] = aff.scale[i] * hsum(_mm256_add_ps(a0, a1)) + aff.zero[i] * zsum[0];
    t[i + 1] = aff.scale[i + 1] * hsum(_mm256_add_ps(b0, b1)) + aff.zero[i + 1] * zsum[0];
  }
  if (i < i1) rows_kernel<BITS, 1>(c, aff, i, i1, z, 0, zsum, t, 0);
}

template <int BITS>
void by_batch(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z, int ldz,
              const float* zsum, int nb, float* t, int ldt) {
  switch (nb) {
    case 1:  // 4 bits: the one-row kernel with 4 accumulators measured faster
      if (BITS == 4) rows_kernel<BITS, 1>(c, aff, i0, i1, z, ldz, zsum, t, ldt);
      else rows_lookup<BITS == 4 ? 2 : BITS>(c, aff, i0, i1, z, zsum, t);
      break;
    case 2: rows_kernel<BITS, 2>(c, aff, i0, i1, z, ldz, zsum, t, ldt); break;
    case 3: rows_kernel<BITS, 3>(c, aff, i0, i1, z, ldz, zsum, t, ldt); break;
    default: rows_kernel<BITS, 4>(c, aff, i0, i1, z, ldz, zsum, t, ldt); break;
  }
}

}  // namespace

// z rows must be zero-padded to a multiple of 8 (the padded codes are zero too).
void qgemv(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z, int ldz,
           const float* zsum, int nb, float* t, int ldt) {
  switch (c.bits) {
    case 2: by_batch<2>(c, aff, i0, i1, z, ldz, zsum, nb, t, ldt); break;
    case 3: by_batch<3>(c, aff, i0, i1, z, ldz, zsum, nb, t, ldt); break;
    default: by_batch<4>(c, aff, i0, i1, z, ldz, zsum, nb, t, ldt); break;
  }
}

}  // namespace avx2
}  // namespace quipc
