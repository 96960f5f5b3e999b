// Portable GEMM micro-kernel for gemm_driver.h: C[rows x cols] (+)= A * panel, with A the
// packed activations (K x kGemmMR) and panel the decoded weights (K x kGemmNR).
#pragma once
#include <cstddef>

#include "kernels.h"

namespace quipc {
namespace {

struct ScalarUkernel {
  static void run(int rows, int K, const float* A, const float* panel, float* C, int ldc,
                  bool accumulate, int cols) {
    for (int r = 0; r < rows; ++r) {
      float acc[kGemmNR] = {};
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < kGemmNR; ++j) acc[j] += A[k * kGemmMR + r] * panel[k * kGemmNR + j];
      float* cr = C + size_t(r) * ldc;
      for (int j = 0; j < cols; ++j) cr[j] = accumulate ? cr[j] + acc[j] : acc[j];
    }
  }
};

}  // namespace
}  // namespace quipc
