#include "trellis_as_int8.h"

#include <algorithm>
#include <cmath>

namespace quipc {

namespace {
// Position j of a row to its Int8Acts slot (a block's evens, then its odds).
inline int slot(int j) { return j / kActBlock * kActBlock + (j & 1) * (kActBlock / 2) + j % kActBlock / 2; }
}  // namespace

Int8RowsData trellis_as_int8_rows(const LayerData& d) {
  const TrellisCodes c = trellis_codes(d);
  const float* code = c.code;
  Int8RowsData out;
  out.m = d.m;
  out.n = d.n;
  out.blocks = act_blocks(d.n);
  const size_t len = size_t(out.blocks) * kActBlock;
  out.q.assign(size_t(d.m) * len, 0);
  out.step.resize(size_t(d.m));
  if (d.format == CodeFormat::kTrellis256) {  // int8 already: q = A8[index], step = scale / rms(A8), exact
    const int8_t* a8 = trellis256_row_code();
    for (int i = 0; i < d.m; ++i) {
      int8_t* q = out.q.data() + size_t(i) * len;
      for (int C = 0; C < d.n / kTrellisTile; ++C) {
        uint32_t states[kTrellisTile];
        trellis_row_states(c, i, C, states);
        for (int j = C * kTrellisTile; j < (C + 1) * kTrellisTile; ++j)
          q[slot(j)] = a8[trellis256_index(states[j % kTrellisTile])];
      }
      out.step[size_t(i)] = d.scale[size_t(i)] / trellis256_rms();
    }
    return out;
  }
  std::vector<float> row(size_t(d.n));
  for (int i = 0; i < d.m; ++i) {
    float peak = 0.f;  // W' / scale: the code values of the row
    for (int C = 0; C < d.n / kTrellisTile; ++C) {
      uint32_t states[kTrellisTile];
      trellis_row_states(c, i, C, states);
      for (int j = 0; j < kTrellisTile; ++j) {
        const float v = code[states[j]];
        row[size_t(C) * kTrellisTile + j] = v;
        peak = std::max(peak, std::fabs(v));
      }
    }
    const float inv = peak > 0.f ? 127.f / peak : 0.f;
    int8_t* q = out.q.data() + size_t(i) * len;
    for (int j = 0; j < d.n; ++j) q[slot(j)] = int8_t(std::lround(row[size_t(j)] * inv));
    out.step[size_t(i)] = d.scale[size_t(i)] * peak / 127.f;
  }
  return out;
}

}  // namespace quipc
