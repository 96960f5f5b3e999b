// Row tiles (kernels.h: RowTiles): a plan's 4-bit codes or int8 rows regrouped 16 rows at a
// time for the AVX-512 VNNI GEMVs, built once at plan creation where the CPU has VNNI
// (LayerData::row_tiles). The builders, the portable reference kernels and the VNNI kernels
// side by side, as the formats'.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "row_tiles_kernels.h"

namespace quipc {

struct RowTilesData {
  std::vector<uint8_t> data;
  std::vector<float> step;  // int8 rows only
  int m = 0, n = 0, blocks = 0, quads = 0;
  bool empty() const { return data.empty(); }
  RowTiles view() const { return RowTiles{data.data(), m, n, blocks, quads, step.empty() ? nullptr : step.data()}; }
};

// 4-bit codes, m rows of row_bytes (Codes' layout: code j of a row at nibble j, low first).
RowTilesData tile_codes4(const uint8_t* codes, size_t row_bytes, int m, int n);
// Int8 rows (their steps copied along).
RowTilesData tile_int8_rows(const Int8Rows& w);

}  // namespace quipc
