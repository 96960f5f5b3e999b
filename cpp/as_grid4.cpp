#include "as_grid4.h"

#include <cmath>
#include <cstring>

#include "e8p.h"

namespace quipc {
namespace {

Grid4Plane empty_plane(const LayerData& d) {
  Grid4Plane p;
  p.codes.assign(size_t(d.m) * size_t(d.n / 2), 0);
  p.scale.resize(size_t(d.m));
  p.zero.resize(size_t(d.m));
  return p;
}

}  // namespace

// An E8P coordinate is an odd multiple of 1/4 within +-11/4, i.e. q/2 - 15/4 (q = 2..13); an
// E8_1bit coordinate (the 3-bit format's second stage) a multiple of 1/2 within +-2, i.e. q/2 - 2
// (q = 0..8). So the stage is exactly the grid row scale/2 * q + zero, zero = -15/4 or -2 times
// the stage's scale.
Grid4Plane e8p_stage_as_grid4(const LayerData& d, int stage) {
  const E8PTables& T = e8p_tables();
  const bool one_bit = stage == 1 && d.bits == 3;
  const float offset = one_bit ? 4.f : 7.5f;
  const int groups = d.n / 8, stages = e8p_stages(d.bits);
  Grid4Plane p = empty_plane(d);
  const size_t row_bytes = size_t(groups) * 4;
  for (int i = 0; i < d.m; ++i) {
    const uint8_t* row = d.codes + size_t(i) * d.row_bytes;
    uint8_t* out = p.codes.data() + size_t(i) * row_bytes;
    for (int g = 0; g < groups; ++g) {
      float v[8];
      if (stage == 0) e8p_point(T, e8p_first(row, d.bits, g), v);
      else if (one_bit) std::memcpy(v, T.one_bit[e8p_second(row, d.bits, g)], sizeof v);
      else e8p_point(T, e8p_second(row, d.bits, g), v);
      uint32_t word = 0;
      for (int j = 0; j < 8; ++j) word |= uint32_t(std::lround(2.f * v[j] + offset)) << (4 * j);
      for (int k = 0; k < 4; ++k) out[size_t(g) * 4 + k] = uint8_t(word >> (8 * k));
    }
    const float s = d.scale[size_t(i) * stages + stage];
    p.scale[size_t(i)] = 0.5f * s;
    p.zero[size_t(i)] = -0.5f * offset * s;
  }
  return p;
}

}  // namespace quipc
