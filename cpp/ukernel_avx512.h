// AVX-512F twins of AVX2 kernels (ukernel_avx512.cpp), taken where the CPU has AVX-512F: the
// GEMM micro-kernel (the same packed activations, K x kGemmMR, and panel, K x kGemmNR) and the
// transforms' dense-factor GEMM.
#pragma once

namespace quipc {

// C[rows x cols] (+)= A * panel, as Avx2Ukernel::run. Only call when cpu_has_avx512f().
void avx512_ukernel(int rows, int K, const float* A, const float* panel, float* C, int ldc,
                    bool accumulate, int cols);

// C (M x N) = A (M x K) * B (K x N), row-major, as the AVX2 gemm_f32 (the transforms' dense
// factors): 16 columns a zmm, 12 rows at a time. Only call when cpu_has_avx512f().
void avx512_gemm_f32(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc);

// AVX-512F at run time, and not turned off by QUIPC_NO_AVX512=1 (tests run both paths).
bool cpu_has_avx512f();

}  // namespace quipc
