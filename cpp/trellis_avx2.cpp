// Format "trellis", AVX2+FMA decode kernels (compiled with -mavx2 -mfma; call only after
// cpu_has_avx2_fma()). Row i's 16 weights of a column tile: its 2k bytes and the 2 spill
// bytes of the tile's next row make one 16-byte vector, broadcast to both lanes;
// one pshufb per 8 weights puts each weight's 4 stream bytes from byte (k c) / 8 into a
// 32-bit lane, most significant first; a variable shift and a mask leave the 12-bit state;
// a gather reads the 8 code values from the 16 KiB table (L1-resident).
#include <immintrin.h>

#include <cstring>

#include "gemm_driver.h"
#include "trellis.h"
#include "ukernel_avx2.h"
#include "avx2_util.h"

namespace quipc {
namespace trellis_avx2 {
namespace {

struct Windows {  // per bit width: the byte shuffles and right shifts of weights 0-7, 8-15
  __m256i shuffle[2], shift[2];
  __m128i spill;    // 0xFF on bytes 2k, 2k + 1: where the next row's first 2 bytes go
};

Windows windows_for(int k) {
  alignas(32) int8_t sh[2][32];
  alignas(32) int32_t sr[2][8];
  alignas(16) int8_t sp[16] = {0};
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 8; ++j) {
      const int o = k * (8 * h + j), at = o >> 3;
      for (int b = 0; b < 4; ++b) sh[h][4 * j + b] = int8_t(at + 3 - b);  // little-endian lane
      sr[h][j] = 32 - kTrellisL - (o & 7);
    }
  sp[2 * k] = sp[2 * k + 1] = -1;
  Windows w;
  for (int h = 0; h < 2; ++h) {
    w.shuffle[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh[h]));
    w.shift[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sr[h]));
  }
  w.spill = _mm_load_si128(reinterpret_cast<const __m128i*>(sp));
  return w;
}

const Windows& windows(int k) {
  static const Windows w[3] = {windows_for(2), windows_for(3), windows_for(4)};
  return w[k - 2];
}

// The code values of row i's 16 weights in column tile C (W' / scale). The row's 2k bytes
// come from one 16-byte load (the bytes after them are shifted out of every window), the
// next row's first 2 bytes are blended in after them; only the matrix's last 16 bytes are
// copied first, so that no load reads past the codes.
inline void tile_row(const TrellisCodes& c, const Windows& w, const float* code, int i, int C,
                     __m256* v0, __m256* v1) {
  const int k = c.bits;
  const int next = (i & ~(kTrellisTile - 1)) | ((i + 1) & (kTrellisTile - 1));
  const size_t at = size_t(i) * c.row_bytes + size_t(C) * 2 * k;
  __m128i own;
  if (at + 16 <= size_t(c.m) * c.row_bytes) {
    own = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c.data + at));
  } else {
    alignas(16) uint8_t buf[16] = {0};
    std::memcpy(buf, c.data + at, size_t(2 * k));
    own = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  uint16_t spill;
  std::memcpy(&spill, c.data + size_t(next) * c.row_bytes + size_t(C) * 2 * k, 2);
  const __m128i row = _mm_blendv_epi8(own, _mm_set1_epi16(int16_t(spill)), w.spill);
  const __m256i bytes = _mm256_broadcastsi128_si256(row);
  const __m256i mask = _mm256_set1_epi32((1 << kTrellisL) - 1);
  const __m256i s0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, w.shuffle[0]), w.shift[0]), mask);
  const __m256i s1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, w.shuffle[1]), w.shift[1]), mask);
  *v0 = _mm256_i32gather_ps(code, s0, 4);
  *v1 = _mm256_i32gather_ps(code, s1, 4);
}

// NB activation vectors; two accumulators per vector (the two halves of a tile row), all in
// registers (a runtime NB kept them in memory: a store-forwarding round trip per FMA).
template <int NB>
void gemv_nb(const TrellisCodes& c, int i0, int i1, const float* z, int ldz, float* t, int ldt) {
  const float* code = c.code;
  const Windows& w = windows(c.bits);
  const int tiles = c.n / kTrellisTile;
  for (int i = i0; i < i1; ++i) {
    __m256 acc0[NB], acc1[NB];
    for (int b = 0; b < NB; ++b) acc0[b] = acc1[b] = _mm256_setzero_ps();
    for (int C = 0; C < tiles; ++C) {
      __m256 v0, v1;
      tile_row(c, w, code, i, C, &v0, &v1);
      for (int b = 0; b < NB; ++b) {
        const float* zb = z + size_t(b) * ldz + kTrellisTile * C;
        acc0[b] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(zb), acc0[b]);
        acc1[b] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(zb + 8), acc1[b]);
      }
    }
    for (int b = 0; b < NB; ++b) t[size_t(b) * ldt + i] = c.scale[i] * hsum(_mm256_add_ps(acc0[b], acc1[b]));
  }
}

}  // namespace

void gemv(const TrellisCodes& c, int i0, int i1, const float* z, int ldz, int nb, float* t, int ldt) {
  switch (nb) {
    case 1: gemv_nb<1>(c, i0, i1, z, ldz, t, ldt); break;
    case 2: gemv_nb<2>(c, i0, i1, z, ldz, t, ldt); break;
    case 3: gemv_nb<3>(c, i0, i1, z, ldz, t, ldt); break;
    default: gemv_nb<4>(c, i0, i1, z, ldz, t, ldt); break;
  }
}

void gemm(const TrellisCodes& c, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
          float* work) {
  const float* code = c.code;
  const Windows& w = windows(c.bits);
  auto pack = [&](int p0, int rows, int k0, int klen, float* panel) {
    alignas(32) float vals[kTrellisTile];
    for (int r = 0; r < kGemmNR; ++r) {
      if (r >= rows) {
        for (int k = 0; k < klen; ++k) panel[k * kGemmNR + r] = 0.f;
        continue;
      }
      const __m256 sc = _mm256_set1_ps(c.scale[p0 + r]);
      for (int k = 0; k < klen; k += kTrellisTile) {
        __m256 v0, v1;
        tile_row(c, w, code, p0 + r, (k0 + k) / kTrellisTile, &v0, &v1);
        _mm256_store_ps(vals, _mm256_mul_ps(v0, sc));
        _mm256_store_ps(vals + 8, _mm256_mul_ps(v1, sc));
        for (int j = 0; j < kTrellisTile; ++j) panel[(k + j) * kGemmNR + r] = vals[j];
      }
    }
  };
  gemm_panels<avx2::Avx2Ukernel>(c.n, i0, i1, z, ldz, nbatch, t, ldt, work, pack);
}

}  // namespace trellis_avx2
}  // namespace quipc
