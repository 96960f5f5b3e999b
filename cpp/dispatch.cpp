// Run-time choice between the AVX2+FMA kernels and the portable ones.
#include <cstdlib>
#include <cstring>

#include "avx2.h"
#include "e8p.h"
#include "int8_rows.h"
#include "kernels.h"
#include "trellis.h"
#include "ukernel_avx512.h"

namespace quipc {

bool cpu_has_avx2_fma() {
#if defined(QUIPC_HAVE_AVX2) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("bmi2");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512f() {
#if defined(QUIPC_HAVE_AVX2) && defined(__GNUC__)
  static const bool ok = [] {
    const char* off = std::getenv("QUIPC_NO_AVX512");
    return __builtin_cpu_supports("avx512f") && !(off != nullptr && *off != '\0' && std::strcmp(off, "0") != 0);
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef QUIPC_HAVE_AVX2
const KernelTable& avx2_kernels() {
  static const KernelTable table{"avx2",         avx2::qgemv,    avx2::quantize_acts, avx2::qgemv4_i8, avx2::qgemm,
                                 avx2::fwht,     avx2::gemm_f32, e8p_avx2::gemv,
                                 e8p_avx2::gemm, trellis_avx2::gemv,
                                 trellis_avx2::gemm, int8_rows_avx2::gemv,
                                 int8_rows_avx2::gemv_i8};
  return table;
}
#else
const KernelTable& avx2_kernels() { return scalar_kernels(); }  // not built for this target
#endif

static bool env_forces_scalar() {
  const char* v = std::getenv("QUIPC_FORCE_SCALAR");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

const KernelTable& select_kernels(bool force_scalar) {
  if (force_scalar || env_forces_scalar() || !cpu_has_avx2_fma()) return scalar_kernels();
  return avx2_kernels();
}

}  // namespace quipc
