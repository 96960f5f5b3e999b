// Format "trellis" on the GPU (cpp/trellis.h defines the layout, trellis_scalar.cpp is the
// CPU reference): t = W' z straight from the codes. The 2^12-entry code table (16 KiB of
// float32) is staged in shared memory per block. A row's 16 weights of column tile C read
// the row's 2k bytes there and the first 2 bytes of the tile's next row (row 0 after row
// 15); weight c's 12-bit state is the window at bit k c of those bytes, most significant
// bit first.
// GEMV (batch <= 4): a warp per output row, a lane per column tile (16 weights) in turn.
// GEMM (batch > 4): gemm_tile.cuh's 64x64 output tiles; each K step of 32 is two column
// tiles, decoded 8 weights per thread into shared memory with the row scales applied.
#include <cstdint>

#include "../trellis.h"
#include "common.cuh"
#include "gemm_tile.cuh"

namespace quipc {
namespace cuda {
namespace {

constexpr int kStates = 1 << kTrellisL;
constexpr int kGemvWarps = 8;

__device__ __forceinline__ void stage_code(const float* __restrict__ code, float* sh) {
  for (int i = threadIdx.x; i < kStates; i += blockDim.x) sh[i] = code[i];
  __syncthreads();
}

// The 2k + 2 bytes that weights 0..15 of row i in column tile C read (byte loads).
template <int K>
__device__ __forceinline__ void tile_row_bytes(const unsigned char* __restrict__ codes, size_t row_bytes,
                                               int i, int C, unsigned char (&buf)[2 * K + 2]) {
  const int next = (i & ~(kTrellisTile - 1)) | ((i + 1) & (kTrellisTile - 1));
  const unsigned char* own = codes + size_t(i) * row_bytes + size_t(C) * 2 * K;
  const unsigned char* spill = codes + size_t(next) * row_bytes + size_t(C) * 2 * K;
#pragma unroll
  for (int b = 0; b < 2 * K; ++b) buf[b] = __ldg(own + b);
  buf[2 * K] = __ldg(spill);
  buf[2 * K + 1] = __ldg(spill + 1);
}

// State of weight j (0..15) from the tile-row bytes.
template <int K>
__device__ __forceinline__ unsigned state_at(const unsigned char (&buf)[2 * K + 2], int j) {
  const int o = K * j, at = o >> 3;
  const unsigned word = (unsigned(buf[at]) << 16) | (unsigned(buf[at + 1]) << 8) | buf[at + 2];
  return (word >> (24 - kTrellisL - (o & 7))) & unsigned(kStates - 1);
}

template <int K, int NB>
__global__ void __launch_bounds__(kGemvWarps * 32)
trellis_gemv_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m, int n, int npad,
                    const float* __restrict__ z, const float* __restrict__ scale,
                    const float* __restrict__ code, float* __restrict__ t) {
  __shared__ float sh[kStates];
  stage_code(code, sh);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, tiles = n / kTrellisTile;
  for (int row = blockIdx.x * kGemvWarps + warp; row < m; row += gridDim.x * kGemvWarps) {
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[b] = 0.f;
    for (int C = lane; C < tiles; C += 32) {
      unsigned char buf[2 * K + 2];
      tile_row_bytes<K>(codes, row_bytes, row, C, buf);
#pragma unroll
      for (int j = 0; j < kTrellisTile; ++j) {
        const float w = sh[state_at<K>(buf, j)];
#pragma unroll
        for (int b = 0; b < NB; ++b)
          acc[b] = fmaf(w, __ldg(z + size_t(b) * npad + kTrellisTile * C + j), acc[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < NB; ++b)
      for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], o);
    if (lane == 0)
      for (int b = 0; b < NB; ++b) t[size_t(b) * m + row] = scale[row] * acc[b];
  }
}

constexpr int kTileM = gemm_tile::kM, kTileB = gemm_tile::kB, kTileK = gemm_tile::kK;
static_assert(kTileK == 2 * kTrellisTile, "a K step is two column tiles");

template <int K>
__global__ void __launch_bounds__(256)
trellis_gemm_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m, int n, int npad,
                    const float* __restrict__ z, int batch, const float* __restrict__ scale,
                    const float* __restrict__ code, float* __restrict__ t) {
  __shared__ float sh[kStates];
  __shared__ gemm_tile::WeightTile ws;
  __shared__ gemm_tile::ActivationTile zs;
  stage_code(code, sh);
  const int tid = threadIdx.x;
  const int i0 = blockIdx.x * kTileM, b0 = blockIdx.y * kTileB;
  const int tiles = n / kTrellisTile;
  float acc[4][4] = {};
  gemm_tile::run_steps(ws, zs, z, npad, batch, b0, tid, [&](int k0) {
    // row tid / 4; weights 8 h .. 8 h + 7 of column tile k0 / 16 + q / 2, h = q % 2
    const int r = tid / 4, q = tid % 4, C = k0 / kTrellisTile + q / 2, h = q % 2;
    float w[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (i0 + r < m && C < tiles) {
      unsigned char buf[2 * K + 2];
      tile_row_bytes<K>(codes, row_bytes, i0 + r, C, buf);
      const float s = scale[i0 + r];
#pragma unroll
      for (int u = 0; u < 8; ++u) w[u] = s * sh[state_at<K>(buf, 8 * h + u)];
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) ws[q * 8 + u][r] = w[u];
  }, acc);
  gemm_tile::store(t, m, batch, i0, b0, tid, acc);
}

template <int K>
void launch_bits(const unsigned char* codes, size_t row_bytes, int m, int n, int npad,
                 const float* z, int batch, const float* scale, const float* code, float* t,
                 cudaStream_t stream) {
  if (batch <= 4) {
    // Each block stages the 16 KiB table once: a few blocks per SM loop over the rows.
    const unsigned grid = gemv_blocks(m, kGemvWarps, 4);
    const unsigned threads = kGemvWarps * 32;
    switch (batch) {
      case 1: trellis_gemv_kernel<K, 1><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, code, t); break;
      case 2: trellis_gemv_kernel<K, 2><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, code, t); break;
      case 3: trellis_gemv_kernel<K, 3><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, code, t); break;
      default: trellis_gemv_kernel<K, 4><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, code, t); break;
    }
  } else {
    const dim3 grid(unsigned((m + kTileM - 1) / kTileM), unsigned((batch + kTileB - 1) / kTileB));
    trellis_gemm_kernel<K><<<grid, 256, 0, stream>>>(codes, row_bytes, m, n, npad, z, batch, scale, code, t);
  }
  QUIPC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_trellis_matmul(const unsigned char* codes, size_t row_bytes, int bits, int m, int n,
                           int npad, const float* z, int batch, const float* scale,
                           const float* code, float* t, cudaStream_t stream) {
  switch (bits) {
    case 2: launch_bits<2>(codes, row_bytes, m, n, npad, z, batch, scale, code, t, stream); break;
    case 3: launch_bits<3>(codes, row_bytes, m, n, npad, z, batch, scale, code, t, stream); break;
    default: launch_bits<4>(codes, row_bytes, m, n, npad, z, batch, scale, code, t, stream); break;
  }
}

}  // namespace cuda
}  // namespace quipc
