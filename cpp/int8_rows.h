// Int8 rows (kernels.h: Int8Rows), the layout of a layer's 8-bit copy of W' that decode GEMVs
// read in one pass: the scalar reference and the AVX2 kernels side by side, as the formats'.
#pragma once
#include "kernels.h"

namespace quipc {
namespace int8_rows_scalar {
void gemv(const Int8Rows&, int i0, int i1, const float* zp, int ldz, int nb, float* t, int ldt);
void gemv_i8(const Int8Rows&, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt);
}  // namespace int8_rows_scalar
namespace int8_rows_avx2 {
void gemv(const Int8Rows&, int i0, int i1, const float* zp, int ldz, int nb, float* t, int ldt);
void gemv_i8(const Int8Rows&, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt);
}  // namespace int8_rows_avx2
}  // namespace quipc
