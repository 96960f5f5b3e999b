// Scalar access to the packed code layout: a group of 8 codes is `bits` bytes read as a
// little-endian integer, code j at bits [bits*j, bits*j + bits).
#pragma once
#include <cstdint>

namespace quipc {
namespace {

// The group as an integer, reading exactly `bits` bytes (never past the group).
inline uint32_t load_group(const uint8_t* g, int bits) {
  uint32_t w = uint32_t(g[0]) | (uint32_t(g[1]) << 8);
  if (bits >= 3) w |= uint32_t(g[2]) << 16;
  if (bits == 4) w |= uint32_t(g[3]) << 24;
  return w;
}

inline int code_at(const uint8_t* row, int bits, int j) {
  uint32_t w = load_group(row + (j >> 3) * bits, bits);
  return int((w >> (bits * (j & 7))) & ((1u << bits) - 1));
}

// Codes [k0, k0 + len) of one row as floats (k0 a multiple of 8).
inline void unpack_floats(const uint8_t* row, int bits, int k0, int len, float* out) {
  const uint32_t mask = (1u << bits) - 1;
  for (int g = 0; g * 8 < len; ++g) {
    uint32_t w = load_group(row + ((k0 >> 3) + g) * bits, bits);
    int cnt = len - g * 8 < 8 ? len - g * 8 : 8;
    for (int u = 0; u < cnt; ++u) out[g * 8 + u] = float((w >> (bits * u)) & mask);
  }
}

}  // namespace
}  // namespace quipc
