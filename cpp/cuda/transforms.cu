// Incoherence transforms on activation rows (CUDA). A side's whole chain of Kronecker factors
// runs as one kernel (kron_chain_rows: one block per row, in shared memory) where the row fits;
// else one kernel per factor: Sylvester factors as in-shared-memory Walsh-Hadamard butterflies
// (one block per row), the others (small Hadamard order, random orthogonal) as a dense product
// along their axis. The first kernel of a chain applies the input scale, the last one the
// output scale and bias, and columns [width, ld_out) are written as zeros (padding).
#include "common.cuh"

namespace quipc {
namespace cuda {
namespace {

__device__ __forceinline__ float finish(float v, int j, const float* post_scale, const float* bias) {
  if (post_scale) v *= post_scale[j];
  if (bias) v += bias[j];
  return v;
}

__global__ void fwht_rows(int pre, int f, int post, int width, const float* src, int ld_src,
                          float* dst, int ld_out, const float* pre_scale,
                          const float* post_scale, const float* bias) {
  extern __shared__ float s[];
  const int b = blockIdx.x;
  const float* in = src + size_t(b) * ld_src;
  for (int j = threadIdx.x; j < width; j += blockDim.x) s[j] = pre_scale ? in[j] * pre_scale[j] : in[j];
  __syncthreads();
  const int len = f * post;  // one (f, post) block per `pre` index
  for (int h = post; h < len; h *= 2) {
    for (int p = threadIdx.x; p < width / 2; p += blockDim.x) {
      const int blk = p / h, off = p % h;  // pair p: positions i and i + h
      const int i = blk * 2 * h + off;
      const float a = s[i], c = s[i + h];
      s[i] = a + c;
      s[i + h] = a - c;
    }
    __syncthreads();
  }
  float* out = dst + size_t(b) * ld_out;
  for (int j = threadIdx.x; j < ld_out; j += blockDim.x)
    out[j] = j < width ? finish(s[j], j, post_scale, bias) : 0.f;
}

__global__ void dense_axis(int f, int post, const float* __restrict__ mat, int width,
                           const float* __restrict__ src, int ld_src, float* __restrict__ dst,
                           int ld_out, const float* pre_scale, const float* post_scale,
                           const float* bias, int batch) {
  const size_t idx = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= size_t(batch) * ld_out) return;
  const int b = int(idx / ld_out), e = int(idx % ld_out);
  if (e >= width) {
    dst[idx] = 0.f;
    return;
  }
  const int q = e % post, i = (e / post) % f, p = e / (post * f);
  const size_t base = size_t(b) * ld_src + size_t(p) * f * post + q;
  const float* row = mat + size_t(i) * f;
  float acc = 0.f;
  for (int j = 0; j < f; ++j) {
    const int col = p * f * post + j * post + q;
    const float v = src[base + size_t(j) * post];
    acc = fmaf(row[j], pre_scale ? v * pre_scale[col] : v, acc);
  }
  dst[size_t(b) * ld_out + e] = finish(acc, e, post_scale, bias);
}

__global__ void scale_copy(int width, const float* src, int ld_src, float* dst, int ld_out,
                           const float* pre_scale, const float* post_scale, const float* bias,
                           int batch) {
  const size_t idx = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= size_t(batch) * ld_out) return;
  const int b = int(idx / ld_out), e = int(idx % ld_out);
  float v = 0.f;
  if (e < width) {
    v = src[size_t(b) * ld_src + e];
    if (pre_scale) v *= pre_scale[e];
    v = finish(v, e, post_scale, bias);
  }
  dst[idx] = v;
}

// The whole chain of a side in one launch (one block per row, the row in shared memory, two
// buffers): each FWHT factor's butterflies in place, each dense factor from one buffer into
// the other. pre_scale is applied as the row is read, post_scale and bias as it is written.
__global__ void kron_chain_rows(KronChain chain, int width, const float* src, int ld_src, float* dst,
                                int ld_out, const float* pre_scale, const float* post_scale,
                                const float* bias) {
  extern __shared__ float s[];
  float* cur = s;
  float* other = s + width;
  const int b = blockIdx.x;
  const float* in = src + size_t(b) * ld_src;
  for (int j = threadIdx.x; j < width; j += blockDim.x) cur[j] = pre_scale ? in[j] * pre_scale[j] : in[j];
  __syncthreads();
  int pre = 1;
  for (int a = 0; a < chain.count; ++a) {
    const int f = chain.order[a], post = width / (pre * f);
    if (chain.mat[a] == nullptr) {  // Sylvester: butterflies at strides post, 2 post, ... along the axis
      for (int h = post; h < f * post; h *= 2) {
        for (int p = threadIdx.x; p < width / 2; p += blockDim.x) {
          const int i = (p / h) * 2 * h + p % h;
          const float x = cur[i], y = cur[i + h];
          cur[i] = x + y;
          cur[i + h] = x - y;
        }
        __syncthreads();
      }
    } else {
      const float* mat = chain.mat[a];
      for (int e = threadIdx.x; e < width; e += blockDim.x) {
        const int q = e % post, i = (e / post) % f, p0 = (e / (post * f)) * f * post + q;
        const float* row = mat + size_t(i) * f;
        float acc = 0.f;
        for (int j = 0; j < f; ++j) acc = fmaf(row[j], cur[p0 + j * post], acc);
        other[e] = acc;
      }
      __syncthreads();
      float* t = cur;
      cur = other;
      other = t;
    }
    pre *= f;
  }
  float* out = dst + size_t(b) * ld_out;
  for (int j = threadIdx.x; j < ld_out; j += blockDim.x)
    out[j] = j < width ? finish(cur[j], j, post_scale, bias) : 0.f;
}

unsigned blocks_for(size_t count, int threads) { return unsigned((count + threads - 1) / threads); }

}  // namespace

void launch_fwht(int pre, int f, int post, int width, const float* src, int ld_src, float* dst,
                 int ld_out, const float* pre_scale, const float* post_scale, const float* bias,
                 int batch, cudaStream_t stream) {
  const size_t smem = sizeof(float) * size_t(width);
  if (smem > 48 * 1024)
    QUIPC_CUDA_CHECK(cudaFuncSetAttribute(fwht_rows, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(smem)));
  fwht_rows<<<batch, 512, smem, stream>>>(pre, f, post, width, src, ld_src, dst, ld_out, pre_scale,
                                          post_scale, bias);
  QUIPC_CUDA_CHECK(cudaGetLastError());
}

bool launch_kron_chain(const KronChain& chain, int width, const float* src, int ld_src, float* dst,
                       int ld_out, const float* pre_scale, const float* post_scale, const float* bias,
                       int batch, cudaStream_t stream) {
  const size_t smem = 2 * sizeof(float) * size_t(width);
  if (chain.count < 1 || chain.count > KronChain::kMax || smem > kChainMaxSmem) return false;
  // One block does the row's whole product: fine for small dense factors (SmolLM2's 36), but a
  // large one (11008 = 43 x 256, both dense) took 0.81 ms on an H200 against 0.054 ms spread
  // over the SMs one kernel per factor (benchmarks/results/kernels_gpu_h200_stop48.json).
  int dense_orders = 0;
  for (int a = 0; a < chain.count; ++a)
    if (chain.mat[a] != nullptr) dense_orders += chain.order[a];
  if (dense_orders > kChainMaxDenseOrders) return false;
  if (smem > 48 * 1024)
    QUIPC_CUDA_CHECK(cudaFuncSetAttribute(kron_chain_rows, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(smem)));
  const int threads = width >= 4096 ? 1024 : width >= 1024 ? 512 : 256;
  kron_chain_rows<<<batch, threads, smem, stream>>>(chain, width, src, ld_src, dst, ld_out, pre_scale,
                                                    post_scale, bias);
  QUIPC_CUDA_CHECK(cudaGetLastError());
  return true;
}

void launch_dense_axis(int pre, int f, int post, const float* mat, int width, const float* src,
                       int ld_src, float* dst, int ld_out, const float* pre_scale,
                       const float* post_scale, const float* bias, int batch, cudaStream_t stream) {
  (void)pre;
  dense_axis<<<blocks_for(size_t(batch) * ld_out, 256), 256, 0, stream>>>(
      f, post, mat, width, src, ld_src, dst, ld_out, pre_scale, post_scale, bias, batch);
  QUIPC_CUDA_CHECK(cudaGetLastError());
}

void launch_scale_copy(int width, const float* src, int ld_src, float* dst, int ld_out,
                       const float* pre_scale, const float* post_scale, const float* bias,
                       int batch, cudaStream_t stream) {
  scale_copy<<<blocks_for(size_t(batch) * ld_out, 256), 256, 0, stream>>>(
      width, src, ld_src, dst, ld_out, pre_scale, post_scale, bias, batch);
  QUIPC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace quipc
