// Format "trellis" on the GPU (cpp/trellis.h defines the layout, trellis_scalar.cpp is the
// CPU reference): t = W' z straight from the codes. The 2^12-entry code table (16 KiB of
// float32) is staged in shared memory per block. A row's 16 weights of column tile C read
// the row's 2k bytes there and the first 2 bytes of the tile's next row (row 0 after row
// 15); weight c's 12-bit state is the window at bit k c of those bytes, most significant
// bit first.
// GEMV (batch <= 4): a warp per R consecutive rows (R = 4, 2 or 1 by batch and row count), a
// lane per column tile in turn. A lane reads its rows' 2k bytes of the tile as 32- or 16-bit
// words (row i's spill bytes are row i + 1's first two, so R rows load R + 1 rows' words, not
// 2R), the 16 activations as four float4 (coalesced across the warp, reused by the R rows),
// and cuts each state from big-endian words by one funnel shift. The first kernel (byte loads,
// a warp per row, one scalar activation load per weight: 0.171 ms for 8192x8192 at 2 bits on
// an H200, 8x the grid GEMV) is still the default: the word-load GEMV was written in a session
// without a GPU (compiled for sm_90, never run), so it runs only under
// QUIPC_CUDA_TRELLIS_ROWS=auto|1|2|4 until scripts/gpu_check.sh has checked and timed it
// (tests/test_kernels_cuda.py compares it with the first kernel and the CPU).
// GEMM (batch > 4): gemm_tile.cuh's 64x64 output tiles; each K step of 32 is two column
// tiles, decoded 8 weights per thread into shared memory with the row scales applied.
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// Row i's 2k bytes of column tile C as big-endian 32-bit words u[0..2] (stream bit 0 = the
// top bit of u[0]), the 16 spill bits left zero. Alignment: 2k C and row_bytes are multiples
// of 4 (k = 2), 8 (k = 4) or 2 (k = 3) when n is a multiple of 16 and codes is 8-aligned.
template <int K>
__device__ __forceinline__ void load_tile_words(const unsigned char* __restrict__ p, unsigned (&u)[3]) {
  if constexpr (K == 2) {
    u[0] = __byte_perm(__ldg(reinterpret_cast<const unsigned*>(p)), 0, 0x0123);
    u[1] = 0u;
  } else if constexpr (K == 4) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    u[0] = __byte_perm(v.x, 0, 0x0123);
    u[1] = __byte_perm(v.y, 0, 0x0123);
  } else {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    const unsigned a = __ldg(h), b = __ldg(h + 1), c = __ldg(h + 2);
    u[0] = __byte_perm(a | (b << 16), 0, 0x0123);
    u[1] = __byte_perm(c, 0, 0x0123);          // bytes 4, 5 on top, the spill below
  }
  u[2] = 0u;
}

// Put the 16 spill bits (the next row's first two bytes, big-endian) after the 2k own bytes.
template <int K>
__device__ __forceinline__ void add_spill(unsigned (&u)[3], unsigned spill16) {
  if constexpr (K == 2) u[1] = spill16 << 16;
  else if constexpr (K == 3) u[1] |= spill16;
  else u[2] = spill16 << 16;
}

// State of weight j: the 12 bits at stream bit k j (j a compile-time constant after unrolling).
template <int K>
__device__ __forceinline__ unsigned word_state(const unsigned (&u)[3], int j) {
  const int o = K * j, a = o >> 5, s = o & 31;
  return __funnelshift_l(u[a + 1 < 3 ? a + 1 : 2], u[a], s) >> (32 - kTrellisL);
}

template <int K, int NB, int R>
__global__ void __launch_bounds__(kGemvWarps * 32)
trellis_gemv_rows_kernel(const unsigned char* __restrict__ codes, size_t row_bytes, int m, int n, int npad,
                         const float* __restrict__ z, const float* __restrict__ scale,
                         const float* __restrict__ code, float* __restrict__ t) {
  static_assert(kTrellisTile % R == 0, "a warp's rows lie in one 16-row tile");
  __shared__ float sh[kStates];
  stage_code(code, sh);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, tiles = n / kTrellisTile;
  for (int row0 = (blockIdx.x * kGemvWarps + warp) * R; row0 < m; row0 += gridDim.x * kGemvWarps * R) {
    const int after = row0 + R;   // the row whose first two bytes are row0 + R - 1's spill
    const int spill_row = (after & (kTrellisTile - 1)) ? after : after - kTrellisTile;
    float acc[R][NB];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;
    for (int C = lane; C < tiles; C += 32) {
      const size_t col = size_t(C) * 2 * K;
      unsigned u[R][3];
#pragma unroll
      for (int r = 0; r < R; ++r) load_tile_words<K>(codes + size_t(row0 + r) * row_bytes + col, u[r]);
      const unsigned short last = __ldg(reinterpret_cast<const unsigned short*>(
          codes + size_t(spill_row) * row_bytes + col));
#pragma unroll
      for (int r = 0; r < R; ++r)
        add_spill<K>(u[r], r + 1 < R ? u[r + 1 < R ? r + 1 : 0][0] >> 16 : __byte_perm(last, 0, 0x3201) & 0xFFFFu);
      float4 zv[NB][4];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float4* zp = reinterpret_cast<const float4*>(z + size_t(b) * npad + kTrellisTile * C);
#pragma unroll
        for (int q = 0; q < 4; ++q) zv[b][q] = __ldg(zp + q);
      }
#pragma unroll
      for (int j = 0; j < kTrellisTile; ++j) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float w = sh[word_state<K>(u[r], j)];
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            const float4& v = zv[b][j / 4];
            const float zj = (j % 4 == 0) ? v.x : (j % 4 == 1) ? v.y : (j % 4 == 2) ? v.z : v.w;
            acc[r][b] = fmaf(w, zj, acc[r][b]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b)
        for (int o = 16; o > 0; o >>= 1) acc[r][b] += __shfl_xor_sync(0xffffffffu, acc[r][b], o);
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) t[size_t(b) * m + row0 + r] = scale[row0 + r] * acc[r][b];
  }
}

template <int K, int NB, int R>
void launch_rows(const unsigned char* codes, size_t row_bytes, int m, int n, int npad, const float* z,
                 const float* scale, const float* code, float* t, cudaStream_t stream) {
  const unsigned grid = gemv_blocks(m / R, kGemvWarps, 4);
  trellis_gemv_rows_kernel<K, NB, R><<<grid, kGemvWarps * 32, 0, stream>>>(codes, row_bytes, m, n, npad, z,
                                                                            scale, code, t);
}

// Rows per warp: the most of 4, 2, 1 that still gives every SM 8 warps (a row count of 8192
// takes 4, SmolLM2's 576 / 1536 one); batches 3 and 4 at most 2 (registers: R x NB accumulators
// and 16 NB activations per lane). QUIPC_CUDA_TRELLIS_ROWS=1|2|4 forces R, auto chooses.
template <int K, int NB>
void launch_gemv(const unsigned char* codes, size_t row_bytes, int m, int n, int npad, const float* z,
                 const float* scale, const float* code, float* t, cudaStream_t stream) {
  const int warps_wanted = 8 * int(gemv_blocks(1 << 30, 1, 1));   // 8 warps per SM
  const char* force = std::getenv("QUIPC_CUDA_TRELLIS_ROWS");       // 1 | 2 | 4: tests and benchmarks
  if (force != nullptr && std::strcmp(force, "auto") != 0) {
    switch (std::atoi(force)) {
      case 4: return launch_rows<K, NB, 4>(codes, row_bytes, m, n, npad, z, scale, code, t, stream);
      case 2: return launch_rows<K, NB, 2>(codes, row_bytes, m, n, npad, z, scale, code, t, stream);
      default: return launch_rows<K, NB, 1>(codes, row_bytes, m, n, npad, z, scale, code, t, stream);
    }
  }
  if (NB <= 2 && m / 4 >= warps_wanted) launch_rows<K, NB, 4>(codes, row_bytes, m, n, npad, z, scale, code, t, stream);
  else if (m / 2 >= warps_wanted) launch_rows<K, NB, 2>(codes, row_bytes, m, n, npad, z, scale, code, t, stream);
  else launch_rows<K, NB, 1>(codes, row_bytes, m, n, npad, z, scale, code, t, stream);
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
  // The word-load GEMV: opt-in (QUIPC_CUDA_TRELLIS_ROWS set; see the top), not under
  // QUIPC_CUDA_GEMV=simple, and only on the alignment its word and float4 loads assume.
  const char* gemv_env = std::getenv("QUIPC_CUDA_GEMV");
  const char* rows_env = std::getenv("QUIPC_CUDA_TRELLIS_ROWS");
  const char* chunks_env = std::getenv("QUIPC_CUDA_TRELLIS_CHUNKS");   // batches 5-16 as 4-row GEMVs
  const bool word_gemv = rows_env != nullptr && rows_env[0] != '\0'
                         && !(gemv_env != nullptr && std::strcmp(gemv_env, "simple") == 0)
                         && reinterpret_cast<uintptr_t>(codes) % 8 == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0
                         && npad % 4 == 0 && n % kTrellisTile == 0 && m % kTrellisTile == 0;
  const auto gemv = [&](const float* zc, int nb, float* tc) {
    switch (nb) {
      case 1: launch_gemv<K, 1>(codes, row_bytes, m, n, npad, zc, scale, code, tc, stream); break;
      case 2: launch_gemv<K, 2>(codes, row_bytes, m, n, npad, zc, scale, code, tc, stream); break;
      case 3: launch_gemv<K, 3>(codes, row_bytes, m, n, npad, zc, scale, code, tc, stream); break;
      default: launch_gemv<K, 4>(codes, row_bytes, m, n, npad, zc, scale, code, tc, stream); break;
    }
  };
  const bool chunked = word_gemv && chunks_env != nullptr && std::strcmp(chunks_env, "1") == 0;
  if (word_gemv && batch <= 4) {
    gemv(z, batch, t);
  } else if (chunked && gemv_chunks(batch, npad, m, z, t, gemv)) {
    // launched, 4 rows at a time, by gemv_chunks
  } else if (batch <= 4) {
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
