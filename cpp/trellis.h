// Code format "trellis" (runtime/quipc_runtime/formats/trellis.py defines it): its decode
// kernels (scalar in trellis_scalar.cpp, AVX2 in trellis_avx2.cpp) and the encoder's Viterbi
// (trellis_encode.cpp + trellis_encode_avx2.cpp; quipc/passes/encoders/trellis_viterbi.py is
// the numpy reference it reproduces state for state).
//
// Layout: W' in tiles of 16 x 16; a tile's weights t = 16 r + c read the 12-bit window at bit
// k t of the tile's circular bitstream (most significant bit first), which is the tile's
// 32 k bytes split by rows: tile row r holds stream bytes [2 k r, 2 k r + 2 k) at
// codes[16 R + r][2 k C ..]. So row i's 16 weights of column tile C need its own 2 k bytes
// and the first 2 bytes of the tile's next row (row 0 after row 15): the window of weight c
// starts at bit k c of those 2 k + 2 bytes. W'[i][16 C + c] = scale[i] * CODE[state].
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "code_format.h"

namespace quipc {

constexpr int kTrellisL = 12;     // state bits
constexpr int kTrellisTile = 16;  // tile side

// CODE of format "trellis": the 2^12 standard-normal quantiles (p + 1/2) / 2^12 at their
// hashed states, over their RMS (float32; built once, thread-safe; equal to code_table() in Python).
const float* trellis_code_table();
// Format "trellis256" (formats/trellis.py): CODE[s] = A8[(s & 255) ^ h(s >> 8)] / rms(A8), h
// linear over GF(2): the XOR of trellis256_hash_column(k) over the set bits k of its 4-bit
// argument; A8 (256 int8) rows r < 8: Q8[16 c + r], rows r + 8 their negations (A8[x ^ 128] = -A8[x]).
const int8_t* trellis256_row_code();   // A8
float trellis256_rms();                // rms(A8)
constexpr uint32_t kTrellis256HashColumns[4] = {0x53, 0xA6, 0x3D, 0x7A};  // h(1 << k) (formats/trellis.py)
inline uint32_t trellis256_hash(uint32_t x) {
  uint32_t h = 0;
  for (int k = 0; k < 4; ++k)
    if ((x >> k) & 1u) h ^= kTrellis256HashColumns[k];
  return h;
}
inline uint32_t trellis256_index(uint32_t s) { return (s & 255u) ^ trellis256_hash(s >> 8); }
const float* trellis256_code_table();  // its 2^12 CODE values
// The code table of a trellis format (kTrellis or kTrellis256).
const float* trellis_code_table(CodeFormat format);

struct TrellisCodes {
  const uint8_t* data;  // m rows of row_bytes = n / 8 * bits
  size_t row_bytes;
  int bits;             // k: 2, 3 or 4
  int m, n;             // multiples of 16
  const float* scale;   // (m)
  const float* code;    // the format's 2^12 code values (trellis_code_table(format))
};

// The 16 states of row i in column tile C.
inline void trellis_row_states(const TrellisCodes& c, int i, int C, uint32_t* states) {
  const int k = c.bits;
  const int next = (i & ~(kTrellisTile - 1)) | ((i + 1) & (kTrellisTile - 1));
  uint8_t buf[16] = {0};
  std::memcpy(buf, c.data + size_t(i) * c.row_bytes + size_t(C) * 2 * k, size_t(2 * k));
  std::memcpy(buf + 2 * k, c.data + size_t(next) * c.row_bytes + size_t(C) * 2 * k, 2);
  for (int j = 0; j < kTrellisTile; ++j) {
    const int o = k * j, at = o >> 3;
    const uint32_t word = (uint32_t(buf[at]) << 16) | (uint32_t(buf[at + 1]) << 8) | buf[at + 2];
    states[j] = (word >> (24 - kTrellisL - (o & 7))) & ((1u << kTrellisL) - 1);
  }
}

// Decode kernels, rows [i0, i1): gemv for nb <= 4 activation vectors (ldz apart), t[b * ldt + i]
// = (W' z_b)_i; gemm for any batch (decoded panels times the micro-kernel; work as qgemm's).
namespace trellis_scalar {
void gemv(const TrellisCodes&, int i0, int i1, const float* z, int ldz, int nb, float* t, int ldt);
void gemm(const TrellisCodes&, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work);
}  // namespace trellis_scalar
namespace trellis_avx2 {
void gemv(const TrellisCodes&, int i0, int i1, const float* z, int ldz, int nb, float* t, int ldt);
void gemm(const TrellisCodes&, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work);
}  // namespace trellis_avx2

// Encodes `batch` sequences of length T (x: batch x T floats, row-major) on the trellis with
// 2^L states and k bits per step (s_{t+1} = (s_t << k | b) mod 2^L), table: the 2^L code
// values. Each path closes into a circle (the top L - k bits of s_0 equal the low L - k bits
// of s_{T-1}); states (batch x T) receives every position's state. Runs on `threads` parts
// of the thread pool; force_scalar picks the portable step functions over the AVX2 ones.
// k in 2..4, 2k <= L <= 16.
void trellis_encode(const float* x, int batch, int T, const float* table, int L, int k,
                    int32_t* states, int threads, bool force_scalar = false);

// One trellis step, in two parts (scalar reference and AVX2 side by side):
//   min_predecessors: best[j] = min_top cost[top * G + j], back[j] = the first top reaching it
//   add_branch:       next[j * K + b] = best[j] + (xt - table[j * K + b])^2
// with K = 2^k predecessors per state and G = 2^L / K groups. The AVX2 versions need G a
// multiple of 32 and do the same float operations in the same order.
struct TrellisStep {
  void (*min_predecessors)(const float* cost, int G, int K, float* best, uint8_t* back);
  void (*add_branch)(const float* best, const float* table, float xt, int G, int K, float* next);
};
const TrellisStep& trellis_step_scalar();
const TrellisStep& trellis_step_avx2();  // only valid when cpu_has_avx2_fma()

}  // namespace quipc
