// The AVX-512F GEMM micro-kernel (ukernel_avx512.cpp), taken by the AVX2 one where the CPU
// has AVX-512F: the same packed activations (K x kGemmMR) and panel (K x kGemmNR).
#pragma once

namespace quipc {

// C[rows x cols] (+)= A * panel, as Avx2Ukernel::run. Only call when cpu_has_avx512f().
void avx512_ukernel(int rows, int K, const float* A, const float* panel, float* C, int ldc,
                    bool accumulate, int cols);

// AVX-512F at run time, and not turned off by QUIPC_NO_AVX512=1 (tests run both paths).
bool cpu_has_avx512f();

}  // namespace quipc
