// Row tiles, AVX-512 VNNI (compiled with -mavx512f -mavx512bw -mavx512vnni; dispatch.cpp takes
// it only where the CPU has them). A 64-byte load holds one quad (4 bytes) of each of a tile's
// 16 rows; vpdpbusd multiplies them by the 4 activation bytes of that quad broadcast to every
// lane and adds the 4 products to each row's int32 lane. Per block of 32 weights and 16 rows,
// 4-bit codes: 4 loads, 8 masks, 8 vpdpbusd; int8 rows: 8 loads, 8 vpdpbusd; then one
// conversion and one FMA by the block's activation step, and no horizontal sums at the end
// (the AVX2 kernels: ~80 instructions for the same 512 weights, gemv_i8_avx2.cpp).
// GCC 12 flags _mm512_cvtepi32_ps's own undefined-source idiom inside unrolled loops (a false
// positive of -Wmaybe-uninitialized in avx512fintrin.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "prefetch.h"
#include "row_tiles_kernels.h"

namespace quipc {
namespace row_tiles_vnni {
namespace {

constexpr int kLine = 64;  // one quad of 16 rows

inline __m512i quad_of(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, sizeof v);
  return _mm512_set1_epi32(v);
}

inline __mmask16 rows_mask(int left) {
  return left >= kTileRows ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

template <int NB>
void tiles4(const RowTiles& w, const RowAffine& aff, int i0, int i1, const Int8Acts& a, const float* zsum,
            float* t, int ldt) {
  const size_t row_acts = size_t(a.blocks) * kActBlock, block_bytes = size_t(w.quads) * kLine;
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(char(0xF0));
  for (int i = i0; i < i1; i += kTileRows) {
    const uint8_t* p = w.data + size_t(i / kTileRows) * w.blocks * block_bytes;
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    for (int blk = 0; blk < w.blocks; ++blk, p += block_bytes) {
      // The high nibbles are taken in place (x & 0xF0: 16 times the code, one op instead of a
      // shift and a mask) into their own sums, divided by 16 (exactly: multiples of 16) at the
      // block's end; |sums| <= 16 * 15 * 127 * 16 products, far from int32's range.
      __m512i s_lo[NB], s_hi[NB];
      for (int b = 0; b < NB; ++b) s_lo[b] = s_hi[b] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        prefetch_ahead(p + k * kLine);
        const __m512i x = _mm512_loadu_si512(p + k * kLine);
        const __m512i lo = _mm512_and_si512(x, low), hi = _mm512_and_si512(x, high);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          const int8_t* q = a.q + size_t(b) * row_acts + size_t(blk) * kActBlock + 4 * k;
          s_lo[b] = _mm512_dpbusd_epi32(s_lo[b], lo, quad_of(q));
          s_hi[b] = _mm512_dpbusd_epi32(s_hi[b], hi, quad_of(q + kActBlock / 2));
        }
      }
      for (int b = 0; b < NB; ++b) {
        const __m512i s = _mm512_add_epi32(s_lo[b], _mm512_srai_epi32(s_hi[b], 4));
        acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a.d[size_t(b) * a.blocks + blk]), acc[b]);
      }
    }
    const __mmask16 rows = rows_mask(i1 - i);
    const __m512 scale = _mm512_maskz_loadu_ps(rows, aff.scale + i), zero = _mm512_maskz_loadu_ps(rows, aff.zero + i);
    for (int b = 0; b < NB; ++b)
      _mm512_mask_storeu_ps(t + size_t(b) * ldt + i, rows,
                            _mm512_fmadd_ps(scale, acc[b], _mm512_mul_ps(zero, _mm512_set1_ps(zsum[b]))));
  }
}

template <int NB>
void tiles8(const RowTiles& w, int i0, int i1, const Int8Acts& a, float* t, int ldt) {
  const size_t row_acts = size_t(a.blocks) * kActBlock, block_bytes = size_t(w.quads) * kLine;
  for (int i = i0; i < i1; i += kTileRows) {
    const uint8_t* p = w.data + size_t(i / kTileRows) * w.blocks * block_bytes;
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    for (int blk = 0; blk < w.blocks; ++blk, p += block_bytes) {
      __m512i s[NB];
      for (int b = 0; b < NB; ++b) s[b] = _mm512_set1_epi32(-128 * a.sums[size_t(b) * a.blocks + blk]);
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        prefetch_ahead(p + k * kLine);
        const __m512i x = _mm512_loadu_si512(p + k * kLine);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b)
          s[b] = _mm512_dpbusd_epi32(s[b], x, quad_of(a.q + size_t(b) * row_acts + size_t(blk) * kActBlock + 4 * k));
      }
      for (int b = 0; b < NB; ++b)
        acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[b]), _mm512_set1_ps(a.d[size_t(b) * a.blocks + blk]), acc[b]);
    }
    const __mmask16 rows = rows_mask(i1 - i);
    const __m512 step = _mm512_maskz_loadu_ps(rows, w.step + i);
    for (int b = 0; b < NB; ++b) _mm512_mask_storeu_ps(t + size_t(b) * ldt + i, rows, _mm512_mul_ps(step, acc[b]));
  }
}

}  // namespace

void gemv4_i8(const RowTiles& w, const RowAffine& aff, int i0, int i1, const Int8Acts& a, const float* zsum,
              int nb, float* t, int ldt) {
  switch (nb) {
    case 1: tiles4<1>(w, aff, i0, i1, a, zsum, t, ldt); break;
    case 2: tiles4<2>(w, aff, i0, i1, a, zsum, t, ldt); break;
    case 3: tiles4<3>(w, aff, i0, i1, a, zsum, t, ldt); break;
    default: tiles4<4>(w, aff, i0, i1, a, zsum, t, ldt); break;
  }
}

void gemv8_i8(const RowTiles& w, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt) {
  switch (nb) {
    case 1: tiles8<1>(w, i0, i1, a, t, ldt); break;
    case 2: tiles8<2>(w, i0, i1, a, t, ldt); break;
    case 3: tiles8<3>(w, i0, i1, a, t, ldt); break;
    default: tiles8<4>(w, i0, i1, a, t, ldt); break;
  }
}

}  // namespace row_tiles_vnni
}  // namespace quipc
