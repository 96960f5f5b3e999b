// The e8p codebooks, built from the constants that lattice.py uses (tests check every
// index against the Python reference decoder).
#include <algorithm>
#include <cstring>
#include <vector>

#include "e8p.h"

namespace quipc {
namespace {

struct Pattern {
  int h[8];  // twice the absolute values: 1, 3, 5 or 7
  int norm4;  // 4 * squared norm
};

void build(E8PTables& T) {
  // Sources: all patterns of squared norm <= 10 (by norm, lexicographic within a norm),
  // then those of norm 12 with five coordinates 3/2 (lexicographic) until 256.
  std::vector<Pattern> low, fives;
  for (int code = 0; code < 1 << 16; ++code) {  // base 4, coordinate 0 most significant
    Pattern p{};
    int count3 = 0;
    for (int j = 0; j < 8; ++j) {
      p.h[j] = 2 * ((code >> (2 * (7 - j))) & 3) + 1;
      p.norm4 += p.h[j] * p.h[j];
      count3 += p.h[j] == 3;
    }
    if (p.norm4 <= 40) low.push_back(p);
    else if (p.norm4 == 48 && count3 == 5) fives.push_back(p);
  }
  std::stable_sort(low.begin(), low.end(),
                   [](const Pattern& a, const Pattern& b) { return a.norm4 < b.norm4; });
  for (size_t k = 0; low.size() < 256 && k < fives.size(); ++k) low.push_back(fives[k]);
  for (int s = 0; s < 256; ++s) {
    int sum = 0;
    for (int j = 0; j < 8; ++j) sum += low[s].h[j];
    const bool odd = (sum / 2) % 2 == 1;  // coordinate sum = sum(h) / 2
    for (int j = 0; j < 8; ++j) T.source[s][j] = 0.5f * float(low[s].h[j]);
    if (odd) T.source[s][7] = -T.source[s][7];
  }
  for (int s = 0; s < 128; ++s) {
    int parity = 0;
    for (int j = 0; j < 7; ++j) {
      const int bit = (s >> j) & 1;
      T.sign_mask[s][j] = bit ? 0x80000000u : 0u;
      parity ^= bit;
    }
    T.sign_mask[s][7] = parity ? 0x80000000u : 0u;
  }
  // E8_1bit: the 112 roots (+-1, +-1, 0^6) by position pair then signs, the 128 (+-1/2)^8
  // with an even number of minus signs in binary order (first coordinate slowest), +2e_i, -2e_i.
  int r = 0;
  std::memset(T.one_bit, 0, sizeof(T.one_bit));
  for (int i = 0; i < 8; ++i)
    for (int j = i + 1; j < 8; ++j)
      for (int sg = 0; sg < 4; ++sg, ++r) {
        T.one_bit[r][i] = (sg & 2) ? -1.f : 1.f;
        T.one_bit[r][j] = (sg & 1) ? -1.f : 1.f;
      }
  for (int bitsv = 0; bitsv < 256; ++bitsv) {
    int neg = 0;
    for (int j = 0; j < 8; ++j) neg += (bitsv >> (7 - j)) & 1;
    if (neg % 2) continue;
    for (int j = 0; j < 8; ++j) T.one_bit[r][j] = ((bitsv >> (7 - j)) & 1) ? -0.5f : 0.5f;
    ++r;
  }
  for (int i = 0; i < 8; ++i) T.one_bit[r + i][i] = 2.f;
  for (int i = 0; i < 8; ++i) T.one_bit[r + 8 + i][i] = -2.f;
}

}  // namespace

const E8PTables& e8p_tables() {
  static const E8PTables* tables = [] {
    static E8PTables t;
    build(t);
    return &t;
  }();
  return *tables;
}

}  // namespace quipc
