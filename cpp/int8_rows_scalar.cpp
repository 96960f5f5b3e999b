// Int8 rows, portable: the definition the AVX2 kernels are tested against.
#include "int8_rows.h"

namespace quipc {

// Position j of a block goes to slot j / 2 (even j) or 16 + j / 2 (odd j), as quantize_acts does.
void permute_acts(const float* z, int n, float* out) {
  const int blocks = act_blocks(n);
  for (int blk = 0; blk < blocks; ++blk)
    for (int j = 0; j < kActBlock; ++j) {
      const int pos = blk * kActBlock + j;
      out[blk * kActBlock + (j & 1) * (kActBlock / 2) + j / 2] = pos < n ? z[pos] : 0.f;
    }
}

namespace int8_rows_scalar {

void gemv(const Int8Rows& w, int i0, int i1, const float* zp, int ldz, int nb, float* t, int ldt) {
  const int len = w.blocks * kActBlock;
  for (int i = i0; i < i1; ++i) {
    const int8_t* q = w.q + size_t(i) * len;
    for (int b = 0; b < nb; ++b) {
      const float* z = zp + size_t(b) * ldz;
      float acc = 0.f;
      for (int j = 0; j < len; ++j) acc += float(q[j]) * z[j];
      t[size_t(b) * ldt + i] = w.step[i] * acc;
    }
  }
}

void gemv_i8(const Int8Rows& w, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt) {
  const int len = w.blocks * kActBlock;
  for (int i = i0; i < i1; ++i) {
    const int8_t* q = w.q + size_t(i) * len;
    for (int b = 0; b < nb; ++b) {
      float acc = 0.f;
      for (int blk = 0; blk < w.blocks; ++blk) {
        const int8_t* qa = a.q + size_t(b) * len + size_t(blk) * kActBlock;
        int32_t dot = 0;
        for (int j = 0; j < kActBlock; ++j) dot += int32_t(q[blk * kActBlock + j]) * qa[j];
        acc += a.d[size_t(b) * a.blocks + blk] * float(dot);
      }
      t[size_t(b) * ldt + i] = w.step[i] * acc;
    }
  }
}

}  // namespace int8_rows_scalar
}  // namespace quipc
