// The prefill GEMM tile shared by every code format's CUDA kernel: 256 threads compute a
// 64-row x 64-vector tile of t = W' z, stepping K by 32. A format's kernel decodes its codes
// into `ws` (one group of 8 weights per thread), then calls the two helpers below.
#pragma once
#include <cuda_runtime.h>

namespace quipc {
namespace cuda {
namespace gemm_tile {

constexpr int kM = 64, kB = 64, kK = 32;
using WeightTile = float[kK][kM + 4];      // ws[k][row]
using ActivationTile = float[kK][kB + 4];  // zs[k][vector]

// zs <- z[b0 .. b0+63][k0 .. k0+31] (zero past batch / npad): 8 activations per thread.
__device__ __forceinline__ void stage_activations(ActivationTile& zs, const float* __restrict__ z,
                                                  int npad, int batch, int b0, int k0, int tid) {
  const int b = tid / 4, kq = (tid % 4) * 8;
  for (int u = 0; u < 8; ++u) {
    const int k = k0 + kq + u;
    zs[kq + u][b] = (b0 + b < batch && k < npad) ? z[size_t(b0 + b) * npad + k] : 0.f;
  }
}

// acc[x][y] += sum_k ws[k][4 ti + x] * zs[k][4 tb + y]: 4 rows x 4 vectors per thread.
__device__ __forceinline__ void accumulate(const WeightTile& ws, const ActivationTile& zs, int ti, int tb,
                                           float (&acc)[4][4]) {
#pragma unroll 8
  for (int kk = 0; kk < kK; ++kk) {
    float a[4], c[4];
    for (int q = 0; q < 4; ++q) a[q] = ws[kk][ti * 4 + q];
    for (int q = 0; q < 4; ++q) c[q] = zs[kk][tb * 4 + q];
    for (int x = 0; x < 4; ++x)
      for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(a[x], c[y], acc[x][y]);
  }
}

// The whole K loop of a tile: per step of 32, decode(k0) fills `ws` (its own threads' part,
// zeros past m / n), the activations are staged, and the product accumulated into acc.
template <class Decode>
__device__ __forceinline__ void run_steps(WeightTile& ws, ActivationTile& zs, const float* __restrict__ z,
                                          int npad, int batch, int b0, int tid, Decode decode,
                                          float (&acc)[4][4]) {
  for (int k0 = 0; k0 < npad; k0 += kK) {
    decode(k0);
    stage_activations(zs, z, npad, batch, b0, k0, tid);
    __syncthreads();
    accumulate(ws, zs, tid % 16, tid / 16, acc);
    __syncthreads();
  }
}

// t[b][i] = acc of this thread's 4 rows x 4 vectors (rows i0 + 4 (tid % 16) + x, vectors
// b0 + 4 (tid / 16) + y), within m and batch.
__device__ __forceinline__ void store(float* __restrict__ t, int m, int batch, int i0, int b0, int tid,
                                      const float (&acc)[4][4]) {
  const int ti = tid % 16, tb = tid / 16;
  for (int y = 0; y < 4; ++y) {
    const int b = b0 + tb * 4 + y;
    if (b >= batch) continue;
    for (int x = 0; x < 4; ++x) {
      const int i = i0 + ti * 4 + x;
      if (i < m) t[size_t(b) * m + i] = acc[x][y];
    }
  }
}

}  // namespace gemm_tile
}  // namespace cuda
}  // namespace quipc
