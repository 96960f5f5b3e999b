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
