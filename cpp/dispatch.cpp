// Run-time choice between the AVX2+FMA kernels and the portable ones.
#include <cstdlib>
#include <cstring>

#include "avx2.h"
#include "e8p.h"
#include "int8_rows.h"
#include "kernels.h"
#include "row_tiles_kernels.h"
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

namespace {
// QUIPC_NO_AVX512 set to a non-empty value other than "0" keeps every kernel on AVX2.
bool avx512_allowed() {
  const char* off = std::getenv("QUIPC_NO_AVX512");
  return !(off != nullptr && *off != '\0' && std::strcmp(off, "0") != 0);
}
}  // namespace

bool cpu_has_avx512f() {
#if defined(QUIPC_HAVE_AVX2) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512f") && avx512_allowed();
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if defined(QUIPC_HAVE_AVX2) && defined(QUIPC_HAVE_AVX512_VNNI) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni") && avx512_allowed();
  return ok;
#else
  return false;
#endif
}

#ifdef QUIPC_HAVE_AVX2
namespace {
// The row tiles' kernels of the AVX2 table: VNNI where the CPU has it; elsewhere the portable
// ones (plans build row tiles only where cpu_has_avx512_vnni(), unless a test asks for them).
using Tiles4 = decltype(KernelTable::tiles4_i8);
using Tiles8 = decltype(KernelTable::tiles8_i8);
Tiles4 tiles4_i8() {
#ifdef QUIPC_HAVE_AVX512_VNNI
  if (cpu_has_avx512_vnni()) return row_tiles_vnni::gemv4_i8;
#endif
  return row_tiles_scalar::gemv4_i8;
}
Tiles8 tiles8_i8() {
#ifdef QUIPC_HAVE_AVX512_VNNI
  if (cpu_has_avx512_vnni()) return row_tiles_vnni::gemv8_i8;
#endif
  return row_tiles_scalar::gemv8_i8;
}
// The transforms' dense factors: AVX-512F where the CPU has it (twice the columns a register).
using GemmF32 = decltype(KernelTable::gemm_f32);
GemmF32 gemm_f32() { return cpu_has_avx512f() ? avx512_gemm_f32 : avx2::gemm_f32; }
}  // namespace

const KernelTable& avx2_kernels() {
  static const KernelTable table{"avx2",         avx2::qgemv,    avx2::quantize_acts, avx2::qgemv4_i8, avx2::qgemm,
                                 avx2::fwht,     gemm_f32(),     e8p_avx2::gemv,
                                 e8p_avx2::gemm, trellis_avx2::gemv,
                                 trellis_avx2::gemm, int8_rows_avx2::gemv,
                                 int8_rows_avx2::gemv_i8, tiles4_i8(), tiles8_i8()};
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
