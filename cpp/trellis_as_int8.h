// A trellis layer's W' rounded to 8 bits per row (LayerData::trellis_as_int8), built once at
// plan creation: q = round(W' / s) in [-127, 127] with s = max_j |W'_ij| / 127 (rounding half
// away from zero, as quipc_runtime/int8_rows.py defines it), stored as Int8Rows (kernels.h) with
// step = s; the decode GEMV then reads one byte a weight in one pass (int8_rows.h) instead of
// gathering each weight's code value from the 16 KiB table. A "trellis256" layer's code is int8
// already: q = A8[index of each state], step = scale / rms(A8), W' itself (no rounding).
#pragma once
#include "quip_linear.h"
#include "trellis.h"

namespace quipc {

// A trellis layer's codes as the trellis kernels read them, with its format's code table.
inline TrellisCodes trellis_codes(const LayerData& d) {
  return TrellisCodes{d.codes, d.row_bytes, d.bits, d.m, d.n, d.scale.data(), trellis_code_table(d.format)};
}

Int8RowsData trellis_as_int8_rows(const LayerData& d);

}  // namespace quipc
