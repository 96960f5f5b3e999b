// Code format "e8p" (runtime/quipc_runtime/formats/e8p.py defines it; lattice.py the
// codebooks). Per row i, per group of 8 weights, `bits` little-endian bytes:
//   2 bits: u16 a              W' = scale[i,0] * E8P[a]
//   3 bits: u16 a, u8 b        W' = scale[i,0] * E8P[a] + scale[i,1] * E8_1bit[b]
//   4 bits: u16 a, u16 b       W' = scale[i,0] * E8P[a] + scale[i,1] * E8P[b]
// E8P[a] = signed source + shift: source = one of 256 vectors of absolute values (a & 0xFF),
// bits 8-14 the signs of coordinates 0..6, coordinate 7's sign the parity of those bits plus
// the source's coordinate sum, bit 15 the shift (0: +1/4, 1: -1/4 on every coordinate).
//
// Decoding here: `source` holds each source with coordinate 7 already negated when its
// coordinate sum is odd, `sign_mask[s]` (s = bits 8-14) the float sign bits of coordinates
// 0..6 plus parity(s) on coordinate 7, so the signed source is source[a & 0xFF] XOR
// sign_mask[(a >> 8) & 0x7F] (every source coordinate is nonzero). The shift adds
// +-1/4 * sum(z over the group) to a dot product: the kernels take those group sums
// (`gsum`, already times 1/4) and flip their sign with bit 15 of the index.
#pragma once
#include <cstddef>
#include <cstdint>

namespace quipc {

struct E8PTables {
  alignas(64) float source[256][8];       // parity folded into coordinate 7's sign
  alignas(64) uint32_t sign_mask[128][8];  // 0x80000000 where the coordinate is negative
  alignas(64) float one_bit[256][8];      // E8_1bit (the 3-bit format's second stage)
};

// Built once from the same constants as lattice.py (thread-safe static).
const E8PTables& e8p_tables();

struct E8PCodes {
  const uint8_t* data;  // m rows of row_bytes = n/8 * bits
  size_t row_bytes;
  int bits;             // 2, 3 or 4
  int m, n;             // n a multiple of 8
  const float* scale;   // (m, stages) row-major; stages = 1 for 2 bits, else 2
};

inline int e8p_stages(int bits) { return bits == 2 ? 1 : 2; }

// Up to this batch the fused GEMV (4 activation vectors per pass over the codes) beats
// decoding panels for the GEMM (measured on SmolLM2 and 4096 x 4096 shapes, AVX2, one
// thread: at 2 bits two GEMV passes still win at batch 8, at 3 and 4 bits the GEMM from 5).
inline int e8p_gemv_max_batch(int bits) { return bits == 2 ? 8 : 4; }

// The signed source of index a (E8P[a] without the shift).
inline void e8p_signed_source(const E8PTables& T, uint32_t a, float* out) {
  const uint32_t* mask = T.sign_mask[(a >> 8) & 0x7F];
  for (int j = 0; j < 8; ++j) {
    union {
      float f;
      uint32_t u;
    } v;
    v.f = T.source[a & 0xFF][j];
    v.u ^= mask[j];
    out[j] = v.f;
  }
}

// The 8 coordinates of E8P[a] (tests compare every index with the Python table).
inline void e8p_point(const E8PTables& T, uint32_t a, float* out) {
  e8p_signed_source(T, a, out);
  const float shift = 0.25f - 0.5f * float((a >> 15) & 1);  // branch-free: the bit is random
  for (int j = 0; j < 8; ++j) out[j] += shift;
}

// Group g of row `row` (already offset by i * row_bytes): the stage indices.
inline uint32_t e8p_first(const uint8_t* row, int bits, int g) {
  const uint8_t* p = row + size_t(g) * bits;
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8);
}
inline uint32_t e8p_second(const uint8_t* row, int bits, int g) {
  const uint8_t* p = row + size_t(g) * bits + 2;
  return bits == 3 ? uint32_t(p[0]) : (uint32_t(p[0]) | (uint32_t(p[1]) << 8));
}

// Kernels (scalar in e8p_scalar.cpp, AVX2+FMA in e8p_avx2.cpp), rows [i0, i1):
//   gemv: nb <= 4 activation vectors z (ldz apart), gsum (nb x n/8, ld n/8) = 1/4 * group
//         sums of z; t[b*ldt + i] = (W' z_b)_i.
//   gemm: any batch, panels of decoded rows times a register-blocked micro-kernel (work:
//         qgemm_work_floats(nbatch) floats, 32-byte aligned, as the grid's qgemm).
namespace e8p_scalar {
void gemv(const E8PCodes&, int i0, int i1, const float* z, int ldz, const float* gsum, int nb,
          float* t, int ldt);
void gemm(const E8PCodes&, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work);
}  // namespace e8p_scalar
namespace e8p_avx2 {
void gemv(const E8PCodes&, int i0, int i1, const float* z, int ldz, const float* gsum, int nb,
          float* t, int ldt);
void gemm(const E8PCodes&, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work);
}  // namespace e8p_avx2

}  // namespace quipc
