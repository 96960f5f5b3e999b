// The row tiles' kernels (row_tiles.h), raw pointers only: the VNNI translation unit includes
// this and kernels.h alone, so that no std template compiled for AVX-512 can be merged into
// the portable code by the linker.
#pragma once
#include "kernels.h"

namespace quipc {

namespace row_tiles_scalar {
void gemv4_i8(const RowTiles&, const RowAffine&, int i0, int i1, const Int8Acts& a, const float* zsum,
              int nb, float* t, int ldt);
void gemv8_i8(const RowTiles&, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt);
}  // namespace row_tiles_scalar

namespace row_tiles_vnni {  // only where cpu_has_avx512_vnni()
void gemv4_i8(const RowTiles&, const RowAffine&, int i0, int i1, const Int8Acts& a, const float* zsum,
              int nb, float* t, int ldt);
void gemv8_i8(const RowTiles&, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt);
}  // namespace row_tiles_vnni

}  // namespace quipc
