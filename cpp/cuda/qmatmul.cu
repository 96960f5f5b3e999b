// Dequantize + matmul on the packed codes (CUDA): t = scale * (codes . z) + zero * sum(z).
// GEMV (batch <= 4, decode; activation pairs per launch): the block stages the activations in
// shared memory, then each warp takes 4 output rows; a lane takes 32 codes per step (4
// groups = 4*bits bytes, loaded as `bits` 32-bit words: code k is bits [bits*k, ...) of
// that little-endian string) and the matching 32 activations, reused for the 4 rows.
// GEMM (batch > 4): 64x64 output tiles, codes decoded into shared memory per K step.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "gemm_tile.cuh"

namespace quipc {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 4;
constexpr int kChunkPad = 36;  // 32 activations + 4 floats of padding per chunk in shared memory

// Codes are decoded without shifts or I2F: a 32-bit window of the chunk holds
// kPerWindow codes below bit 23; code c at bit offset r becomes the float 2^23 + c*2^r via
// one AND+OR (LOP3) into the mantissa, minus 2^23 (exact). The activations are stored
// pre-multiplied by 2^-r (exact power-of-two scaling), so the product is c * z.
template <int BITS>
struct Windows {
  static constexpr int kPerWindow = 23 / BITS;  // 11, 7, 5 codes
  __host__ __device__ static constexpr int offset(int k) { return BITS * (k % kPerWindow); }
};

template <int BITS>
__device__ __forceinline__ unsigned window(const unsigned (&w)[BITS], int k0) {
  const int pos = BITS * k0, word = pos / 32, sh = pos % 32;
  if (sh == 0) return w[word];
  if (word + 1 < BITS) return __funnelshift_r(w[word], w[word + 1], sh);
  return w[word] >> sh;
}

// Loads activations [b0, b0 + NB) into shared memory, chunk-padded and pre-scaled; returns
// their row sums in zsum (shared).
template <int BITS, int NB>
__device__ void stage_activations(const float* z, int npad, int n, int chunks, float* zs, float* zsum) {
  __shared__ float part[kWarps][NB];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int b = 0; b < NB; ++b) {
    float sum = 0.f;
    for (int j = threadIdx.x; j < chunks * 32; j += blockDim.x) {
      const float v = z[size_t(b) * npad + j];
      sum += j < n ? v : 0.f;
      const int k = j % 32;
      // times 2^-offset, exactly (a power-of-two float built from its exponent bits)
      zs[(b * chunks + j / 32) * kChunkPad + k] = v * __int_as_float((127 - Windows<BITS>::offset(k)) << 23);
    }
    for (int j = chunks * 32 + threadIdx.x; j < n; j += blockDim.x) sum += z[size_t(b) * npad + j];
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) part[warp][b] = sum;
  }
  __syncthreads();
  if (threadIdx.x < NB) {
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += part[w][threadIdx.x];
    zsum[threadIdx.x] = sum;
  }
  __syncthreads();
}

template <int BITS, int NB>
__global__ void __launch_bounds__(kWarps * 32)
qgemv_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m, int n, int npad,
             bool aligned, const float* __restrict__ z, const float* __restrict__ scale,
             const float* __restrict__ zero, float* __restrict__ t) {
  extern __shared__ float4 smem4[];
  float* zs = reinterpret_cast<float*>(smem4);
  __shared__ float zsum[NB];
  const int groups = (n + 7) / 8;
  const int chunks = aligned ? groups / 4 : 0;  // 4-group chunks read with word loads
  stage_activations<BITS, NB>(z, npad, n, chunks, zs, zsum);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  constexpr int kPer = Windows<BITS>::kPerWindow;
  const int tiles = (m + kWarps * kRowsPerWarp - 1) / (kWarps * kRowsPerWarp);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int row0 = (tile * kWarps + warp) * kRowsPerWarp;
    float acc[kRowsPerWarp][NB];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;
    for (int c = lane; c < chunks; c += 32) {
      unsigned w[kRowsPerWarp][BITS];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = row0 + r < m ? row0 + r : m - 1;  // clamped: loads stay in bounds
        const unsigned* src = reinterpret_cast<const unsigned*>(
            codes + size_t(row) * row_bytes + size_t(c) * 4 * BITS);
#pragma unroll
        for (int q = 0; q < BITS; ++q) w[r][q] = __ldg(src + q);
      }
#pragma unroll
      for (int k4 = 0; k4 < 8; ++k4) {
        float zv[NB][4];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const float4 v = *reinterpret_cast<const float4*>(zs + (b * chunks + c) * kChunkPad + 4 * k4);
          zv[b][0] = v.x; zv[b][1] = v.y; zv[b][2] = v.z; zv[b][3] = v.w;
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int k = 4 * k4 + u;
            const unsigned win = window<BITS>(w[r], k - k % kPer);
            const unsigned bits = (win & (((1u << BITS) - 1u) << Windows<BITS>::offset(k))) | 0x4B000000u;
            const float f = __int_as_float(bits) - 8388608.f;
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(f, zv[b][u], acc[r][b]);
          }
        }
      }
    }
    // Remaining groups (all of them when rows are not word aligned): byte loads, plain z.
    for (int g = chunks * 4 + lane; g < groups; g += 32) {
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = row0 + r;
        if (row >= m) break;
        const unsigned w = load_group_bytes(codes + size_t(row) * row_bytes + size_t(g) * BITS, BITS);
        for (int u = 0; u < 8; ++u) {
          const float f = code_to_float((w >> (BITS * u)) & ((1u << BITS) - 1u));
          for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(f, z[size_t(b) * npad + g * 8 + u], acc[r][b]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b)
        for (int o = 16; o > 0; o >>= 1) acc[r][b] += __shfl_xor_sync(0xffffffffu, acc[r][b], o);
    if (lane == 0) {
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = row0 + r;
        if (row >= m) break;
        for (int b = 0; b < NB; ++b) t[size_t(b) * m + row] = scale[row] * acc[r][b] + zero[row] * zsum[b];
      }
    }
  }
}

// Fallback GEMV (QUIPC_CUDA_GEMV=simple): a warp per output row, byte loads, activations
// straight from global memory. Slower; kept as a cross-check of the fast kernel.
template <int BITS>
__global__ void qgemv_simple_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m,
                                    int n, int npad, const float* __restrict__ z, int batch,
                                    const float* __restrict__ scale, const float* __restrict__ zero,
                                    float* __restrict__ t) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= m) return;
  const int groups = (n + 7) / 8;
  for (int b = 0; b < batch; ++b) {
    const float* zb = z + size_t(b) * npad;
    float acc = 0.f, sum = 0.f;
    for (int j = lane; j < n; j += 32) sum += zb[j];
    for (int g = lane; g < groups; g += 32) {
      const unsigned w = load_group_bytes(codes + size_t(row) * row_bytes + size_t(g) * BITS, BITS);
      for (int u = 0; u < 8; ++u)
        acc = fmaf(code_to_float((w >> (BITS * u)) & ((1u << BITS) - 1u)), zb[g * 8 + u], acc);
    }
    for (int o = 16; o > 0; o >>= 1) {
      acc += __shfl_xor_sync(0xffffffffu, acc, o);
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    if (lane == 0) t[size_t(b) * m + row] = scale[row] * acc + zero[row] * sum;
  }
}

constexpr int kTileM = gemm_tile::kM, kTileB = gemm_tile::kB;

template <int BITS>
__global__ void __launch_bounds__(256)
qgemm_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m, int n, int npad,
             const float* __restrict__ z, int batch, const float* __restrict__ scale,
             const float* __restrict__ zero, float* __restrict__ t) {
  __shared__ gemm_tile::WeightTile ws;
  __shared__ gemm_tile::ActivationTile zs;
  __shared__ float zsum[kTileB];
  const int tid = threadIdx.x;
  const int i0 = blockIdx.x * kTileM, b0 = blockIdx.y * kTileB;
  {  // row sums of this tile's activations: 4 threads per batch row
    const int b = tid / 4, part = tid % 4;
    float s = 0.f;
    if (b0 + b < batch)
      for (int j = part; j < n; j += 4) s += z[size_t(b0 + b) * npad + j];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if (part == 0) zsum[b] = s;
  }
  const int groups = (n + 7) / 8;
  const int ti = tid % 16, tb = tid / 16;  // 4 rows x 4 batch per thread
  float acc[4][4] = {};
  gemm_tile::run_steps(ws, zs, z, npad, batch, b0, tid, [&](int k0) {
    // one group (8 codes) per thread: row tid/4, group tid%4
    const int r = tid / 4, gq = tid % 4, g = k0 / 8 + gq;
    unsigned w = 0;
    if (i0 + r < m && g < groups) w = load_group_bytes(codes + size_t(i0 + r) * row_bytes + size_t(g) * BITS, BITS);
    for (int u = 0; u < 8; ++u) ws[gq * 8 + u][r] = code_to_float((w >> (BITS * u)) & ((1u << BITS) - 1u));
  }, acc);
  for (int y = 0; y < 4; ++y) {
    const int b = b0 + tb * 4 + y;
    if (b >= batch) continue;
    for (int x = 0; x < 4; ++x) {
      const int i = i0 + ti * 4 + x;
      if (i < m) t[size_t(b) * m + i] = scale[i] * acc[x][y] + zero[i] * zsum[tb * 4 + y];
    }
  }
}

template <int BITS>
void launch_bits(const unsigned char* codes, size_t row_bytes, int m, int n, int npad,
                 const float* z, int batch, const float* scale, const float* zero, float* t,
                 cudaStream_t stream) {
  const int groups = (n + 7) / 8;
  const bool aligned = row_bytes % (4 * BITS) == 0 && reinterpret_cast<uintptr_t>(codes) % 16 == 0;
  const int chunks = aligned ? groups / 4 : 0;
  const size_t smem_per_vec = sizeof(float) * size_t(chunks) * kChunkPad;
  const char* env = std::getenv("QUIPC_CUDA_GEMV");
  if (batch <= 4 && env != nullptr && std::strcmp(env, "simple") == 0) {
    qgemv_simple_kernel<BITS><<<unsigned((m + 7) / 8), 256, 0, stream>>>(codes, row_bytes, m, n, npad, z, batch, scale, zero, t);
  } else if (batch <= 4 && smem_per_vec * 2 <= 200 * 1024) {
    const unsigned blocks = gemv_blocks(m, kWarps * kRowsPerWarp, 2);
    for (int b0 = 0; b0 < batch; b0 += 2) {  // activation pairs share one pass over the codes
      const float* zb = z + size_t(b0) * npad;
      float* tb = t + size_t(b0) * m;
      if (batch - b0 == 1) {
        auto kern = qgemv_kernel<BITS, 1>;
        if (smem_per_vec > 48 * 1024)
          QUIPC_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_per_vec)));
        kern<<<blocks, kWarps * 32, smem_per_vec, stream>>>(codes, row_bytes, m, n, npad, aligned, zb, scale, zero, tb);
      } else {
        auto kern = qgemv_kernel<BITS, 2>;
        if (2 * smem_per_vec > 48 * 1024)
          QUIPC_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(2 * smem_per_vec)));
        kern<<<blocks, kWarps * 32, 2 * smem_per_vec, stream>>>(codes, row_bytes, m, n, npad, aligned, zb, scale, zero, tb);
      }
      QUIPC_CUDA_CHECK(cudaGetLastError());
    }
  } else {
    const dim3 grid(unsigned((m + kTileM - 1) / kTileM), unsigned((batch + kTileB - 1) / kTileB));
    qgemm_kernel<BITS><<<grid, 256, 0, stream>>>(codes, row_bytes, m, n, npad, z, batch, scale, zero, t);
  }
  QUIPC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_qmatmul(const unsigned char* codes, size_t row_bytes, int bits, int m, int n, int npad,
                    const float* z, int batch, const float* scale, const float* zero, float* t,
                    cudaStream_t stream) {
  if (gemv_chunks(batch, npad, m, z, t, [&](const float* zc, int rows, float* tc) {
        launch_qmatmul(codes, row_bytes, bits, m, n, npad, zc, rows, scale, zero, tc, stream);
      }))
    return;
  switch (bits) {
    case 2: launch_bits<2>(codes, row_bytes, m, n, npad, z, batch, scale, zero, t, stream); break;
    case 3: launch_bits<3>(codes, row_bytes, m, n, npad, z, batch, scale, zero, t, stream); break;
    default: launch_bits<4>(codes, row_bytes, m, n, npad, z, batch, scale, zero, t, stream); break;
  }
}

}  // namespace cuda
}  // namespace quipc
