// Format "e8p", AVX2+FMA kernels (compiled with -mavx2 -mfma -mbmi2; call only after
// cpu_has_avx2_fma()). See e8p.h for the decode: a group's signed source is one 32-byte
// load from the 8 KB source table XOR one from the 4 KB sign-mask table, so the codebook
// stays in L1 and no dense weight is ever written.
//
// GEMV: per group and row, source XOR mask, FMA with the group's activations (loaded once
// for all the rows of a step). The indices come from one 8-byte load per 2-4 groups; each
// table offset is one rorx + and. The +-1/4 shift is applied 8 groups at a time: the shift
// bits of 8 indices are moved to the float sign bit (one pshufb) and XORed onto the
// activations' group sums (times 1/4), which are added to the same accumulator.
// Measured (4096 x 4096, one thread, a shared 2-core VM): the kernel is bound by the
// micro-op count, two lookups (~9 uops) per group and row against the grid's ~4-5; variants
// that did not pay off: offsets computed 8 at a time in vector registers and reloaded from
// the stack (~40% slower), a 1 MB fp16 table of all 65536 points (L2 latency, no gain).
// GEMM: 8 rows x 1 group decoded (scales applied), transposed 8x8 in registers into the
// panel of gemm_driver.h, multiplied by the 6x16 micro-kernel of ukernel_avx2.h.
#include <immintrin.h>

#include <cstring>

#include "e8p.h"
#include "gemm_driver.h"
#include "ukernel_avx2.h"
#include "avx2_util.h"

namespace quipc {
namespace e8p_avx2 {
namespace {

inline uint32_t u16_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// E8P[a] without the shift.
inline __m256 signed_source(const E8PTables& T, uint32_t a) {
  return _mm256_xor_ps(
      _mm256_load_ps(T.source[a & 0xFF]),
      _mm256_load_ps(reinterpret_cast<const float*>(T.sign_mask[(a >> 8) & 0x7F])));
}

template <class Table>
inline const float* byte_offset(const Table& table, uint32_t offset) {
  return reinterpret_cast<const float*>(reinterpret_cast<const char*>(table) + offset);
}

// 32 * the byte at bit `at` of x: the offset of its row in a (256, 8) float table.
inline uint64_t rotr(uint64_t x, int k) { return k == 0 ? x : (x >> k) | (x << (64 - k)); }

inline uint32_t row_offset(uint64_t x, int at) {
  return uint32_t(rotr(x, (at - 5) & 63)) & 0x1FE0u;
}

// E8P[a] without the shift, for the u16 a at bit `at` of x.
inline __m256 signed_source_at(const E8PTables& T, uint64_t x, int at) {
  const uint32_t mask_offset = uint32_t(rotr(x, at + 3)) & 0xFE0u;  // 32 * bits 8-14
  return _mm256_xor_ps(_mm256_load_ps(byte_offset(T.source, row_offset(x, at))),
                       _mm256_load_ps(byte_offset(T.sign_mask, mask_offset)));
}

// Group k (0..7) of an 8-group block: the 8-byte word to load (byte `start` of the block,
// never past its 8 * BITS bytes) and the group's bit offset in it.
template <int BITS>
inline void word_of(int k, int* start, int* at) {
  if (BITS == 2) {
    *start = 8 * (k / 4);
    *at = 16 * (k % 4);
  } else if (BITS == 3) {  // pairs at bytes 0, 6, 12 and (the last, from 16) 18
    *start = k / 2 < 3 ? 6 * (k / 2) : 16;
    *at = 8 * (3 * k - *start);
  } else {
    *start = 8 * (k / 2);
    *at = 32 * (k % 2);
  }
}

// Float sign bit in lane k = the shift bit (bit 15) of the u16 at byte BITS*k + OFF of the
// 8 groups at p. Reads only those 8*BITS bytes: the two 16-byte halves are p and p + H.
template <int BITS, int OFF>
inline __m256 shift_signs(const uint8_t* p) {
  constexpr int H = BITS == 2 ? 0 : BITS == 3 ? 8 : 16;
  constexpr char b0 = char(OFF + 1), b1 = char(BITS + OFF + 1), b2 = char(2 * BITS + OFF + 1),
                 b3 = char(3 * BITS + OFF + 1), b4 = char(4 * BITS + OFF + 1 - H),
                 b5 = char(5 * BITS + OFF + 1 - H), b6 = char(6 * BITS + OFF + 1 - H),
                 b7 = char(7 * BITS + OFF + 1 - H);
  const __m256i ctrl = _mm256_setr_epi8(-1, -1, -1, b0, -1, -1, -1, b1, -1, -1, -1, b2, -1, -1,
                                        -1, b3, -1, -1, -1, b4, -1, -1, -1, b5, -1, -1, -1, b6,
                                        -1, -1, -1, b7);
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + H));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), ctrl);
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0x80000000u))));
}

// R rows x NB activation vectors; U accumulators per (row, vector, stage) over
// alternating groups (FMA latency).
template <int BITS, int NB, int R, int U>
void rows_kernel(const E8PCodes& c, int i, const float* z, int ldz, const float* gsum,
                 float* t, int ldt) {
  constexpr int S = BITS == 2 ? 1 : 2;
  const E8PTables& T = e8p_tables();
  const int groups = c.n / 8;
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = c.data + size_t(i + r) * c.row_bytes;
  __m256 acc[S][U][R][NB];
  for (int s = 0; s < S; ++s)
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) acc[s][u][r][b] = _mm256_setzero_ps();
  float tail[S][R][NB] = {};

  // Group g, accumulator set u: x[r] holds row r's group at bit `at` (the indices become
  // byte offsets into the tables with one shift and one mask each).
  auto group = [&](int g, int u, const uint64_t* x, int at) {
    __m256 zv[NB];
    for (int b = 0; b < NB; ++b) zv[b] = _mm256_loadu_ps(z + size_t(b) * ldz + 8 * g);
    for (int r = 0; r < R; ++r) {
      const __m256 v = signed_source_at(T, x[r], at);
      for (int b = 0; b < NB; ++b) acc[0][u][r][b] = _mm256_fmadd_ps(v, zv[b], acc[0][u][r][b]);
      if (BITS == 3) {
        const __m256 w = _mm256_load_ps(byte_offset(T.one_bit, row_offset(x[r], at + 16)));
        for (int b = 0; b < NB; ++b) acc[1][u][r][b] = _mm256_fmadd_ps(w, zv[b], acc[1][u][r][b]);
      } else if (BITS == 4) {
        const __m256 w = signed_source_at(T, x[r], at + 16);
        for (int b = 0; b < NB; ++b) acc[S - 1][u][r][b] = _mm256_fmadd_ps(w, zv[b], acc[S - 1][u][r][b]);
      }
    }
  };

  int g = 0;
  for (; g + 8 <= groups; g += 8) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row[r] + size_t(g) * BITS;
      const __m256 sh0 = shift_signs<BITS, 0>(p);
      const __m256 sh1 = BITS == 4 ? shift_signs<BITS, 2>(p) : sh0;
      for (int b = 0; b < NB; ++b) {
        const __m256 gs = _mm256_loadu_ps(gsum + size_t(b) * groups + g);
        acc[0][0][r][b] = _mm256_add_ps(acc[0][0][r][b], _mm256_xor_ps(gs, sh0));
        if (BITS == 4)
          acc[S - 1][0][r][b] = _mm256_add_ps(acc[S - 1][0][r][b], _mm256_xor_ps(gs, sh1));
      }
    }
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      int start, at;
      word_of<BITS>(k, &start, &at);
      uint64_t x[R];
      for (int r = 0; r < R; ++r) std::memcpy(&x[r], row[r] + size_t(g) * BITS + start, 8);
      group(g + k, k % U, x, at);
    }
  }
  for (; g < groups; ++g) {  // fewer than 8 groups left: exact loads, shifts one by one
    uint64_t x[R];
    for (int r = 0; r < R; ++r) {
      x[r] = 0;
      std::memcpy(&x[r], row[r] + size_t(g) * BITS, BITS);  // little-endian
    }
    group(g, 0, x, 0);
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = row[r] + size_t(g) * BITS;
      for (int b = 0; b < NB; ++b) {
        const float gs = gsum[size_t(b) * groups + g];
        tail[0][r][b] += (p[1] & 0x80) ? -gs : gs;
        if (BITS == 4) tail[S - 1][r][b] += (p[3] & 0x80) ? -gs : gs;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* sc = c.scale + size_t(i + r) * S;
    for (int b = 0; b < NB; ++b) {
      float out = 0.f;
      for (int s = 0; s < S; ++s) {
        __m256 sum = acc[s][0][r][b];
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[s][u][r][b]);
        out += sc[s] * (hsum(sum) + tail[s][r][b]);
      }
      t[size_t(b) * ldt + i + r] = out;
    }
  }
}

template <int BITS, int NB, int R, int U>
void rows(const E8PCodes& c, int i0, int i1, const float* z, int ldz, const float* gsum, float* t,
          int ldt) {
  int i = i0;
  for (; i + R <= i1; i += R) rows_kernel<BITS, NB, R, U>(c, i, z, ldz, gsum, t, ldt);
  for (; i < i1; ++i) rows_kernel<BITS, NB, 1, U>(c, i, z, ldz, gsum, t, ldt);
}

// Rows per step (R) and accumulators per chain (U) measured best on a 4096 x 4096 layer
// (enough independent FMA chains for the latency, few enough accumulators for 16 registers).
template <int BITS>
void by_batch(const E8PCodes& c, int i0, int i1, const float* z, int ldz, const float* gsum, int nb,
              float* t, int ldt) {
  constexpr bool two = BITS == 2;
  switch (nb) {
    case 1: rows<BITS, 1, two ? 2 : 4, two ? 2 : 1>(c, i0, i1, z, ldz, gsum, t, ldt); break;
    case 2: rows<BITS, 2, two ? 4 : 2, 1>(c, i0, i1, z, ldz, gsum, t, ldt); break;
    case 3: rows<BITS, 3, two ? 4 : 2, 1>(c, i0, i1, z, ldz, gsum, t, ldt); break;
    default: rows<BITS, 4, two ? 2 : 1, 1>(c, i0, i1, z, ldz, gsum, t, ldt); break;
  }
}

// out[j] = column j of the 8x8 matrix whose rows are in[0..7].
inline void transpose8(__m256 in[8], __m256 out[8]) {
  __m256 t[8], u[8];
  for (int q = 0; q < 4; ++q) {
    t[2 * q] = _mm256_unpacklo_ps(in[2 * q], in[2 * q + 1]);
    t[2 * q + 1] = _mm256_unpackhi_ps(in[2 * q], in[2 * q + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 *a = t + 4 * h;  // rows 4h .. 4h+3
    u[4 * h + 0] = _mm256_shuffle_ps(a[0], a[2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(a[0], a[2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(a[1], a[3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(a[1], a[3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    out[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// E8P[a], shift included (branch-free: the shift bit is random, a branch on it mispredicts).
inline __m256 point(const E8PTables& T, uint32_t a) {
  alignas(8) static const float kShift[2] = {0.25f, -0.25f};
  return _mm256_add_ps(signed_source(T, a), _mm256_broadcast_ss(&kShift[(a >> 15) & 1]));
}

// W' of one group, scales applied (as the reference: s0 * stage 1 + s1 * stage 2).
template <int BITS>
inline __m256 decode(const E8PTables& T, const uint8_t* p, const float* sc) {
  __m256 w = _mm256_mul_ps(_mm256_set1_ps(sc[0]), point(T, u16_at(p)));
  if (BITS == 3) w = _mm256_fmadd_ps(_mm256_set1_ps(sc[1]), _mm256_load_ps(T.one_bit[p[2]]), w);
  if (BITS == 4) w = _mm256_fmadd_ps(_mm256_set1_ps(sc[1]), point(T, u16_at(p + 2)), w);
  return w;
}

template <int BITS>
void gemm_bits(const E8PCodes& c, int i0, int i1, const float* z, int ldz, int nbatch, float* t,
               int ldt, float* work) {
  constexpr int S = BITS == 2 ? 1 : 2;
  const E8PTables& T = e8p_tables();
  auto pack = [&](int p0, int rows, int k0, int klen, float* panel) {
    for (int r0 = 0; r0 < kGemmNR; r0 += 8) {
      const uint8_t* row[8];
      const float* sc[8];
      const int live = rows - r0 < 0 ? 0 : (rows - r0 > 8 ? 8 : rows - r0);
      for (int q = 0; q < live; ++q) {
        row[q] = c.data + size_t(p0 + r0 + q) * c.row_bytes;
        sc[q] = c.scale + size_t(p0 + r0 + q) * S;
      }
      for (int k = 0; k < klen; k += 8) {
        const int g = (k0 + k) / 8;
        __m256 in[8], out[8];
        for (int q = 0; q < 8; ++q)
          in[q] = q < live ? decode<BITS>(T, row[q] + size_t(g) * BITS, sc[q]) : _mm256_setzero_ps();
        transpose8(in, out);
        for (int j = 0; j < 8; ++j) _mm256_store_ps(panel + (k + j) * kGemmNR + r0, out[j]);
      }
    }
  };
  gemm_panels<avx2::Avx2Ukernel>(c.n, i0, i1, z, ldz, nbatch, t, ldt, work, pack);
}

}  // namespace

void gemv(const E8PCodes& c, int i0, int i1, const float* z, int ldz, const float* gsum, int nb,
          float* t, int ldt) {
  switch (c.bits) {
    case 2: by_batch<2>(c, i0, i1, z, ldz, gsum, nb, t, ldt); break;
    case 3: by_batch<3>(c, i0, i1, z, ldz, gsum, nb, t, ldt); break;
    default: by_batch<4>(c, i0, i1, z, ldz, gsum, nb, t, ldt); break;
  }
}

// work must be 32-byte aligned (the panel is written and read with aligned accesses).
void gemm(const E8PCodes& c, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work) {
  switch (c.bits) {
    case 2: gemm_bits<2>(c, i0, i1, z, ldz, nbatch, t, ldt, work); break;
    case 3: gemm_bits<3>(c, i0, i1, z, ldz, nbatch, t, ldt, work); break;
    default: gemm_bits<4>(c, i0, i1, z, ldz, nbatch, t, ldt, work); break;
  }
}

}  // namespace e8p_avx2
}  // namespace quipc
