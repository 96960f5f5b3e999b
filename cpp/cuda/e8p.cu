// Format "e8p" on the GPU (cpp/e8p.h defines the decode): t = W' z straight from the codes.
// The codebooks (the 256 sources with coordinate 7's parity sign folded in, E8_1bit) are
// staged in shared memory per block; a group's signs are bits 8-14 of its index plus
// their parity (__popc) on coordinate 7, applied by XOR on the float sign bit, and the
// +-1/4 shift is added to the source coordinates before the FMA.
// GEMV (batch <= 4): a warp per output row, a lane per group (8 weights) in turn.
// GEMM (batch > 4): 64x64 output tiles, a K step of 32 decoded into shared memory with
// the row scales applied (as the grid's qgemm_kernel, without its epilogue).
#include <cstdint>

#include "common.cuh"
#include "gemm_tile.cuh"

namespace quipc {
namespace cuda {
namespace {

constexpr int kTable = 256 * 8;  // floats per codebook
constexpr int kGemvWarps = 8;

__device__ __forceinline__ void stage_tables(const float* __restrict__ tables, float* sh) {
  for (int i = threadIdx.x; i < 2 * kTable; i += blockDim.x) sh[i] = tables[i];
  __syncthreads();
}

// E8P[a] (shift included) into v[8]; `source` is the shared source table.
__device__ __forceinline__ void e8p_point(const float* source, unsigned a, float v[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(source + (a & 0xFFu) * 8);
  const float4 hi = *reinterpret_cast<const float4*>(source + (a & 0xFFu) * 8 + 4);
  const unsigned s7 = (a >> 8) & 0x7Fu;
  const unsigned signs = s7 | ((__popc(s7) & 1u) << 7);
  const float shift = (a & 0x8000u) ? -0.25f : 0.25f;
  const float src[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int j = 0; j < 8; ++j)
    v[j] = __int_as_float(__float_as_int(src[j]) ^ int(((signs >> j) & 1u) << 31)) + shift;
}

// W' of group g of a row (scales applied): stage 1 + stage 2.
template <int BITS>
__device__ __forceinline__ void decode_group(const unsigned char* __restrict__ row, int g,
                                             const float* sh, float s0, float s1, float w[8]) {
  const unsigned word = load_group_bytes(row + size_t(g) * BITS, BITS);
  e8p_point(sh, word & 0xFFFFu, w);
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] *= s0;
  if (BITS == 3) {
    const float* ob = sh + kTable + ((word >> 16) & 0xFFu) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = fmaf(s1, ob[j], w[j]);
  } else if (BITS == 4) {
    float v[8];
    e8p_point(sh, word >> 16, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = fmaf(s1, v[j], w[j]);
  }
}

template <int BITS, int NB, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * 32)
e8p_gemv_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m, int n, int npad,
                const float* __restrict__ z, const float* __restrict__ scale,
                const float* __restrict__ tables, float* __restrict__ t) {
  __shared__ __align__(16) float sh[2 * kTable];
  stage_tables(tables, sh);
  constexpr int S = BITS == 2 ? 1 : 2;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, groups = n / 8;
  for (int row = blockIdx.x * kGemvWarps + warp; row < m; row += gridDim.x * kGemvWarps) {
    const unsigned char* r = codes + size_t(row) * row_bytes;
    float acc[S][NB];
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[s][b] = 0.f;
    for (int g = lane; g < groups; g += 32) {
      const unsigned word = load_group_bytes(r + size_t(g) * BITS, BITS);
      float zv[NB][8];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float* zg = z + size_t(b) * npad + g * 8;
        if (VEC) {  // 16-byte aligned activations
          const float4 a = __ldg(reinterpret_cast<const float4*>(zg));
          const float4 c = __ldg(reinterpret_cast<const float4*>(zg + 4));
          zv[b][0] = a.x; zv[b][1] = a.y; zv[b][2] = a.z; zv[b][3] = a.w;
          zv[b][4] = c.x; zv[b][5] = c.y; zv[b][6] = c.z; zv[b][7] = c.w;
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) zv[b][j] = __ldg(zg + j);
        }
      }
      float v[8];
      e8p_point(sh, word & 0xFFFFu, v);
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[0][b] = fmaf(v[j], zv[b][j], acc[0][b]);
      if (BITS > 2) {
        if (BITS == 3) {
          const float* ob = sh + kTable + ((word >> 16) & 0xFFu) * 8;
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = ob[j];
        } else {
          e8p_point(sh, word >> 16, v);
        }
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[S - 1][b] = fmaf(v[j], zv[b][j], acc[S - 1][b]);
      }
    }
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
      for (int b = 0; b < NB; ++b)
        for (int o = 16; o > 0; o >>= 1) acc[s][b] += __shfl_xor_sync(0xffffffffu, acc[s][b], o);
    if (lane == 0) {
      for (int b = 0; b < NB; ++b) {
        float out = scale[size_t(row) * S] * acc[0][b];
        if (S == 2) out += scale[size_t(row) * S + 1] * acc[S - 1][b];
        t[size_t(b) * m + row] = out;
      }
    }
  }
}

constexpr int kTileM = gemm_tile::kM, kTileB = gemm_tile::kB;

template <int BITS>
__global__ void __launch_bounds__(256)
e8p_gemm_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m, int n, int npad,
                const float* __restrict__ z, int batch, const float* __restrict__ scale,
                const float* __restrict__ tables, float* __restrict__ t) {
  __shared__ __align__(16) float sh[2 * kTable];
  __shared__ gemm_tile::WeightTile ws;
  __shared__ gemm_tile::ActivationTile zs;
  stage_tables(tables, sh);
  constexpr int S = BITS == 2 ? 1 : 2;
  const int tid = threadIdx.x;
  const int i0 = blockIdx.x * kTileM, b0 = blockIdx.y * kTileB;
  const int groups = n / 8;
  float acc[4][4] = {};
  gemm_tile::run_steps(ws, zs, z, npad, batch, b0, tid, [&](int k0) {
    // one group per thread: row tid / 4, group tid % 4 of this K step
    const int r = tid / 4, gq = tid % 4, g = k0 / 8 + gq;
    float w[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (i0 + r < m && g < groups) {
      const float* sc = scale + size_t(i0 + r) * S;
      decode_group<BITS>(codes + size_t(i0 + r) * row_bytes, g, sh, sc[0], S == 2 ? sc[S - 1] : 0.f, w);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) ws[gq * 8 + u][r] = w[u];
  }, acc);
  gemm_tile::store(t, m, batch, i0, b0, tid, acc);
}

template <int BITS, bool VEC>
void gemv_batch(unsigned grid, const unsigned char* codes, size_t row_bytes, int m, int n, int npad,
                const float* z, int batch, const float* scale, const float* tables, float* t,
                cudaStream_t stream) {
  const unsigned threads = kGemvWarps * 32;
  switch (batch) {
    case 1: e8p_gemv_kernel<BITS, 1, VEC><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, tables, t); break;
    case 2: e8p_gemv_kernel<BITS, 2, VEC><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, tables, t); break;
    case 3: e8p_gemv_kernel<BITS, 3, VEC><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, tables, t); break;
    default: e8p_gemv_kernel<BITS, 4, VEC><<<grid, threads, 0, stream>>>(codes, row_bytes, m, n, npad, z, scale, tables, t); break;
  }
}

template <int BITS>
void launch_bits(const unsigned char* codes, size_t row_bytes, int m, int n, int npad,
                 const float* z, int batch, const float* scale, const float* tables, float* t,
                 cudaStream_t stream) {
  if (batch <= 4) {
    // Each block stages the 16 KB of codebooks once: a few blocks per SM loop over the rows.
    const unsigned grid = gemv_blocks(m, kGemvWarps, 4);
    const bool vec = reinterpret_cast<uintptr_t>(z) % 16 == 0 && npad % 4 == 0;
    if (vec) gemv_batch<BITS, true>(grid, codes, row_bytes, m, n, npad, z, batch, scale, tables, t, stream);
    else gemv_batch<BITS, false>(grid, codes, row_bytes, m, n, npad, z, batch, scale, tables, t, stream);
  } else {
    const dim3 grid(unsigned((m + kTileM - 1) / kTileM), unsigned((batch + kTileB - 1) / kTileB));
    e8p_gemm_kernel<BITS><<<grid, 256, 0, stream>>>(codes, row_bytes, m, n, npad, z, batch, scale, tables, t);
  }
  QUIPC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_e8p_matmul(const unsigned char* codes, size_t row_bytes, int bits, int m, int n,
                       int npad, const float* z, int batch, const float* scale,
                       const float* tables, float* t, cudaStream_t stream) {
  if (gemv_chunks(batch, npad, m, z, t, [&](const float* zc, int rows, float* tc) {
        launch_e8p_matmul(codes, row_bytes, bits, m, n, npad, zc, rows, scale, tables, tc, stream);
      }))
    return;
  switch (bits) {
    case 2: launch_bits<2>(codes, row_bytes, m, n, npad, z, batch, scale, tables, t, stream); break;
    case 3: launch_bits<3>(codes, row_bytes, m, n, npad, z, batch, scale, tables, t, stream); break;
    default: launch_bits<4>(codes, row_bytes, m, n, npad, z, batch, scale, tables, t, stream); break;
  }
}

}  // namespace cuda
}  // namespace quipc
