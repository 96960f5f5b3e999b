// Shared helpers of the CUDA kernels.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define QUIPC_CUDA_CHECK(expr)                                                               \
  do {                                                                                       \
    cudaError_t err_ = (expr);                                                               \
    if (err_ != cudaSuccess)                                                                 \
      throw std::runtime_error(std::string("CUDA error in " #expr ": ") +                    \
                               cudaGetErrorString(err_));                                    \
  } while (0)

namespace quipc {
namespace cuda {

// Exact int -> float for small codes without I2F (a quarter-rate instruction): the code
// is OR-ed into the mantissa of 2^23 and 2^23 subtracted again.
__device__ __forceinline__ float code_to_float(unsigned code) {
  return __int_as_float(0x4B000000u | code) - 8388608.f;
}

// The `bits` bytes of one group as a little-endian integer (byte loads: any alignment).
__device__ __forceinline__ unsigned load_group_bytes(const unsigned char* g, int bits) {
  unsigned w = unsigned(g[0]) | (unsigned(g[1]) << 8);
  if (bits >= 3) w |= unsigned(g[2]) << 16;
  if (bits == 4) w |= unsigned(g[3]) << 24;
  return w;
}

// Blocks for a GEMV kernel that loops over its rows (rows_per_block each pass): every row
// covered, at most `per_sm` blocks per SM (each block stages its codebook once).
inline unsigned gemv_blocks(int m, int rows_per_block, int per_sm) {
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    QUIPC_CUDA_CHECK(cudaGetDevice(&dev));
    QUIPC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  }
  const unsigned blocks = unsigned((m + rows_per_block - 1) / rows_per_block);
  return blocks < unsigned(per_sm * sms) ? blocks : unsigned(per_sm * sms);
}

// Batches of 5..kChunkedGemvMax rows of the grid and e8p formats run as GEMVs of at most 4 rows
// each, not through the 64x64 GEMM tile. Batch 16 on an H200, 2 bits, tile -> chunks (ms,
// benchmarks/results/kernels_gpu_h200_stop48*.json): grid 8192x8192 0.486 -> 0.236, 4096x4096
// 0.243 -> 0.102, 576x576 0.036 -> 0.042; e8p 0.495 -> 0.415, 0.249 -> 0.120, 0.039 -> 0.028.
// Not trellis: its 4-row GEMV made 8192x8192 0.56 -> 2.28.
constexpr int kGemvMaxBatch = 4, kChunkedGemvMax = 16;
template <class Launch>
bool gemv_chunks(int batch, int npad, int m, const float* z, float* t, Launch&& launch) {
  if (batch <= kGemvMaxBatch || batch > kChunkedGemvMax) return false;
  for (int b0 = 0; b0 < batch; b0 += kGemvMaxBatch)
    launch(z + size_t(b0) * npad, batch - b0 < kGemvMaxBatch ? batch - b0 : kGemvMaxBatch, t + size_t(b0) * m);
  return true;
}

// Launchers (qmatmul.cu, transforms.cu).
void launch_qmatmul(const unsigned char* codes, size_t row_bytes, int bits, int m, int n, int npad,
                    const float* z, int batch, const float* scale, const float* zero, float* t,
                    cudaStream_t stream);
// Format "e8p" (e8p.cu): scale (m, stages); tables = the 256x8 sources (parity folded in)
// then the 256x8 E8_1bit table, on the device.
void launch_e8p_matmul(const unsigned char* codes, size_t row_bytes, int bits, int m, int n,
                       int npad, const float* z, int batch, const float* scale,
                       const float* tables, float* t, cudaStream_t stream);
// Format "trellis" (trellis.cu): scale (m); code = the 2^12 code values, on the device.
void launch_trellis_matmul(const unsigned char* codes, size_t row_bytes, int bits, int m, int n,
                           int npad, const float* z, int batch, const float* scale,
                           const float* code, float* t, cudaStream_t stream);
// A side's Kronecker factors for kron_chain_rows (transforms.cu): order[a] and, for a dense
// factor, its order x order matrix on the device (nullptr: a Sylvester factor, FWHT).
struct KronChain {
  static constexpr int kMax = 6;
  int count = 0;
  int order[kMax] = {};
  const float* mat[kMax] = {};
};
// Shared memory the chain kernel may take (two rows): a row of up to 25,600 floats; and the
// largest sum of its dense factors' orders (the multiply-adds per element of the row).
constexpr size_t kChainMaxSmem = 200 * 1024;
constexpr int kChainMaxDenseOrders = 64;
// The chain in one launch; false (nothing launched) where it does not fit.
bool launch_kron_chain(const KronChain& chain, int width, const float* src, int ld_src, float* dst,
                       int ld_out, const float* pre_scale, const float* post_scale, const float* bias,
                       int batch, cudaStream_t stream);
void launch_fwht(int pre, int f, int post, int width, const float* src, int ld_src, float* dst,
                 int ld_out, const float* pre_scale, const float* post_scale, const float* bias,
                 int batch, cudaStream_t stream);
void launch_dense_axis(int pre, int f, int post, const float* mat, int width, const float* src,
                       int ld_src, float* dst, int ld_out, const float* pre_scale,
                       const float* post_scale, const float* bias, int batch, cudaStream_t stream);
void launch_scale_copy(int width, const float* src, int ld_src, float* dst, int ld_out,
                       const float* pre_scale, const float* post_scale, const float* bias,
                       int batch, cudaStream_t stream);

}  // namespace cuda
}  // namespace quipc
