// Row tiles: the builders and the portable reference kernels, the definition the VNNI kernels
// are tested against.
#include "row_tiles.h"

#include <cstring>
#include <stdexcept>

namespace quipc {
namespace {

constexpr int kQuadBytes = 4;

size_t tile_bytes(const RowTilesData& t) { return size_t(t.blocks) * t.quads * kTileRows * kQuadBytes; }

RowTilesData shaped(int m, int n, int quads) {
  if (m < 1 || n < 1) throw std::invalid_argument("row tiles need a positive shape");
  RowTilesData t;
  t.m = m;
  t.n = n;
  t.blocks = act_blocks(n);
  t.quads = quads;
  t.data.assign(size_t((m + kTileRows - 1) / kTileRows) * tile_bytes(t), 0);
  return t;
}

// Where quad k (bytes 4k..4k+3) of row i's block blk starts, in tiles of `blocks` blocks of
// `quads` quads.
inline size_t quad_offset(int blocks, int quads, int i, int blk, int k) {
  return ((size_t(i / kTileRows) * blocks + blk) * quads + k) * kTileRows * kQuadBytes + size_t(i % kTileRows) * kQuadBytes;
}

// Where byte `byte` (< quads * 4) of row i's block blk goes.
size_t tile_offset(const RowTilesData& t, int i, int blk, int byte) {
  return quad_offset(t.blocks, t.quads, i, blk, byte / kQuadBytes) + byte % kQuadBytes;
}

// The 4 bytes of row i, block blk, quad k.
inline const uint8_t* quad_at(const RowTiles& t, int i, int blk, int k) {
  return t.data + quad_offset(t.blocks, t.quads, i, blk, k);
}

// Row i times activation row b: per block the integer dot product of its codes (4-bit: a byte's
// nibbles meet slots 4k + j and 16 + 4k + j; int8 rows: bytes + 128, and 128 times the block's
// activation sum taken off), scaled by the block's step, summed in block order.
float row_dot(const RowTiles& w, int i, const Int8Acts& a, int b) {
  const size_t row_acts = size_t(a.blocks) * kActBlock;
  float acc = 0.f;
  for (int blk = 0; blk < w.blocks; ++blk) {
    const int8_t* q = a.q + size_t(b) * row_acts + size_t(blk) * kActBlock;
    int32_t dot = 0;
    for (int k = 0; k < w.quads; ++k) {
      const uint8_t* c = quad_at(w, i, blk, k);
      for (int j = 0; j < kQuadBytes; ++j)
        dot += w.quads == 4 ? (c[j] & 15) * q[kQuadBytes * k + j] + (c[j] >> 4) * q[kActBlock / 2 + kQuadBytes * k + j]
                            : int32_t(c[j]) * q[kQuadBytes * k + j];
    }
    if (w.quads != 4) dot -= 128 * a.sums[size_t(b) * a.blocks + blk];
    acc += a.d[size_t(b) * a.blocks + blk] * float(dot);
  }
  return acc;
}

}  // namespace

RowTilesData tile_codes4(const uint8_t* codes, size_t row_bytes, int m, int n) {
  if (row_bytes != size_t((n + 7) / 8) * 4) throw std::invalid_argument("row tiles: not 4-bit rows");
  RowTilesData t = shaped(m, n, kActBlock / 8);
  const int block_bytes = kActBlock / 2;
  for (int i = 0; i < m; ++i)
    for (int blk = 0; blk < t.blocks; ++blk)
      for (int byte = 0; byte < block_bytes && size_t(blk) * block_bytes + byte < row_bytes; ++byte)
        t.data[tile_offset(t, i, blk, byte)] = codes[size_t(i) * row_bytes + size_t(blk) * block_bytes + byte];
  return t;
}

RowTilesData tile_int8_rows(const Int8Rows& w) {
  RowTilesData t = shaped(w.m, w.n, kActBlock / kQuadBytes);
  const size_t len = size_t(w.blocks) * kActBlock;
  for (int i = 0; i < w.m; ++i)
    for (int blk = 0; blk < t.blocks; ++blk)
      for (int byte = 0; byte < kActBlock; ++byte)
        t.data[tile_offset(t, i, blk, byte)] = uint8_t(int(w.q[size_t(i) * len + size_t(blk) * kActBlock + byte]) + 128);
  t.step.assign(w.step, w.step + w.m);
  return t;
}

namespace row_tiles_scalar {

void gemv4_i8(const RowTiles& w, const RowAffine& aff, int i0, int i1, const Int8Acts& a, const float* zsum,
              int nb, float* t, int ldt) {
  for (int i = i0; i < i1; ++i)
    for (int b = 0; b < nb; ++b) t[size_t(b) * ldt + i] = aff.scale[i] * row_dot(w, i, a, b) + aff.zero[i] * zsum[b];
}

void gemv8_i8(const RowTiles& w, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt) {
  for (int i = i0; i < i1; ++i)
    for (int b = 0; b < nb; ++b) t[size_t(b) * ldt + i] = w.step[i] * row_dot(w, i, a, b);
}

}  // namespace row_tiles_scalar
}  // namespace quipc
