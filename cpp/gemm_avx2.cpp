// Dequantize + GEMM (prefill): the blocked driver of gemm_driver.h with the 6x16 AVX2/FMA
// micro-kernel of ukernel_avx2.h.
#include <immintrin.h>

#include "avx2.h"
#include "gemm_driver.h"
#include "ukernel_avx2.h"

namespace quipc {
namespace avx2 {

// work must be 32-byte aligned (the panel is read with aligned loads).
void qgemm(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z, int ldz,
           const float* zsum, int nbatch, float* t, int ldt, float* work) {
  qgemm_driver<Avx2Ukernel>(c, aff, i0, i1, z, ldz, zsum, nbatch, t, ldt, work);
}

}  // namespace avx2
}  // namespace quipc
