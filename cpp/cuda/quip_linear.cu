// CudaPlan: device copies of one layer and the fused forward (transform in, quantized
// matmul, transform out), all launched on the caller's stream.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../e8p.h"
#include "../trellis.h"
#include "common.cuh"
#include "cuda_plan.h"

namespace quipc {
namespace cuda {
namespace {

// Makes `device` current for the scope, restoring the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    QUIPC_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) QUIPC_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

template <class T>
T* upload(const T* host, size_t count) {
  if (count == 0) return nullptr;
  T* dev = nullptr;
  QUIPC_CUDA_CHECK(cudaMalloc(&dev, sizeof(T) * count));
  QUIPC_CUDA_CHECK(cudaMemcpy(dev, host, sizeof(T) * count, cudaMemcpyHostToDevice));
  return dev;
}

double fwht_gain(const std::vector<HostFactor>& fs) {
  double g = 1.0;
  for (const auto& f : fs)
    if (f.fwht) g /= std::sqrt(double(f.order));
  return g;
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: report none
    return 0;
  }
  return count;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  QUIPC_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

CudaPlan::CudaPlan(int device, const HostLayer& L)
    : format_(L.format), device_(device), m_(L.m), n_(L.n), bits_(L.bits), npad_((L.n + 7) / 8 * 8),
      row_bytes_(L.row_bytes) {
  if (device < 0 || device >= device_count()) throw std::invalid_argument("no such CUDA device");
  DeviceGuard guard(device_);
  try {
    codes_ = upload(L.codes, size_t(L.m) * L.row_bytes);
    scale_ = upload(L.scale.data(), L.scale.size());
    zero_ = upload(L.zero.data(), L.zero.size());
    if (format_ == CodeFormat::kE8P) {
      const E8PTables& T = e8p_tables();
      std::vector<float> tables(2 * 256 * 8);
      for (int i = 0; i < 256; ++i)
        for (int j = 0; j < 8; ++j) {
          tables[i * 8 + j] = T.source[i][j];
          tables[256 * 8 + i * 8 + j] = T.one_bit[i][j];
        }
      tables_ = upload(tables.data(), tables.size());
    } else if (is_trellis(format_)) {
      tables_ = upload(trellis_code_table(format_), size_t(1) << kTrellisL);
    }
    std::vector<float> in_vec(L.in_scale), out_vec(L.out_scale);
    const float gin = float(fwht_gain(L.in_factors)), gout = float(fwht_gain(L.out_factors));
    for (float& v : in_vec) v *= gin;
    for (float& v : out_vec) v *= gout;
    in_vec_ = upload(in_vec.data(), in_vec.size());
    out_vec_ = upload(out_vec.data(), out_vec.size());
    bias_ = upload(L.bias.data(), L.bias.size());
    for (const auto& f : L.in_factors) in_f_.push_back({f.order, f.fwht, upload(f.mat.data(), f.mat.size())});
    for (const auto& f : L.out_factors) out_f_.push_back({f.order, f.fwht, upload(f.mat.data(), f.mat.size())});
  } catch (...) {
    release();
    throw;
  }
}

CudaPlan::~CudaPlan() { release(); }

void CudaPlan::release() {
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  for (void* p : {static_cast<void*>(codes_), static_cast<void*>(scale_), static_cast<void*>(zero_),
                  static_cast<void*>(in_vec_), static_cast<void*>(out_vec_), static_cast<void*>(bias_),
                  static_cast<void*>(work_), static_cast<void*>(tables_)})
    if (p) cudaFree(p);
  for (auto& f : in_f_) if (f.mat) cudaFree(f.mat);
  for (auto& f : out_f_) if (f.mat) cudaFree(f.mat);
  codes_ = nullptr; scale_ = zero_ = in_vec_ = out_vec_ = bias_ = work_ = tables_ = nullptr;
  in_f_.clear(); out_f_.clear();
  cudaSetDevice(prev);
}

float* CudaPlan::workspace(size_t floats) {
  if (floats > work_floats_) {
    if (work_) QUIPC_CUDA_CHECK(cudaFree(work_));
    work_ = nullptr;
    QUIPC_CUDA_CHECK(cudaMalloc(&work_, sizeof(float) * floats));
    work_floats_ = floats;
  }
  return work_;
}

// Applies the factors in order: src (ld_src) -> dst (ld_out, zero padded past width).
// Intermediates live in the last 2 * batch * width floats of the workspace.
void CudaPlan::apply_factors(const std::vector<DevFactor>& fs, int width, int ld_out,
                             const float* src, int ld_src, float* dst, const float* pre_scale,
                             const float* post_scale, const float* bias, int batch, void* stream_) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  if (fs.empty()) {
    launch_scale_copy(width, src, ld_src, dst, ld_out, pre_scale, post_scale, bias, batch, stream);
    return;
  }
  const char* chain_env = std::getenv("QUIPC_CUDA_CHAIN");   // "0": one kernel per factor (benchmarks)
  if (fs.size() <= size_t(KronChain::kMax) && !(chain_env && std::strcmp(chain_env, "0") == 0)) {
    KronChain chain;
    chain.count = int(fs.size());
    for (size_t a = 0; a < fs.size(); ++a) {
      chain.order[a] = fs[a].order;
      chain.mat[a] = fs[a].fwht ? nullptr : fs[a].mat;
    }
    if (launch_kron_chain(chain, width, src, ld_src, dst, ld_out, pre_scale, post_scale, bias, batch, stream))
      return;
  }
  const size_t off = size_t(batch) * (npad_ + m_);
  float* tmp[2] = {work_ + off, work_ + off + size_t(batch) * width};
  const float* cur = src;
  int ld_cur = ld_src;
  int pre = 1;
  for (size_t a = 0; a < fs.size(); ++a) {
    const bool first = a == 0, last = a + 1 == fs.size();
    float* out = last ? dst : tmp[a % 2];
    const int ld = last ? ld_out : width;
    const int f = fs[a].order, post = width / (pre * f);
    if (fs[a].fwht)
      launch_fwht(pre, f, post, width, cur, ld_cur, out, ld, first ? pre_scale : nullptr,
                  last ? post_scale : nullptr, last ? bias : nullptr, batch, stream);
    else
      launch_dense_axis(pre, f, post, fs[a].mat, width, cur, ld_cur, out, ld,
                        first ? pre_scale : nullptr, last ? post_scale : nullptr,
                        last ? bias : nullptr, batch, stream);
    cur = out;
    ld_cur = ld;
    pre *= f;
  }
}

void CudaPlan::transform_in(const float* x, float* z, int batch, uintptr_t stream) {
  if (batch <= 0) return;
  DeviceGuard guard(device_);
  workspace(size_t(batch) * (npad_ + m_ + 2 * std::max(n_, m_)));
  apply_factors(in_f_, n_, npad_, x, n_, z, in_vec_, nullptr, nullptr, batch,
                reinterpret_cast<void*>(stream));
}

void CudaPlan::matmul(const float* z, float* t, int batch, uintptr_t stream) {
  if (batch <= 0) return;
  DeviceGuard guard(device_);
  if (format_ == CodeFormat::kE8P)
    launch_e8p_matmul(codes_, row_bytes_, bits_, m_, n_, npad_, z, batch, scale_, tables_, t,
                      reinterpret_cast<cudaStream_t>(stream));
  else if (is_trellis(format_))
    launch_trellis_matmul(codes_, row_bytes_, bits_, m_, n_, npad_, z, batch, scale_, tables_, t,
                          reinterpret_cast<cudaStream_t>(stream));
  else
    launch_qmatmul(codes_, row_bytes_, bits_, m_, n_, npad_, z, batch, scale_, zero_, t,
                   reinterpret_cast<cudaStream_t>(stream));
}

void CudaPlan::transform_out(const float* t, float* y, int batch, uintptr_t stream) {
  if (batch <= 0) return;
  DeviceGuard guard(device_);
  workspace(size_t(batch) * (npad_ + m_ + 2 * std::max(n_, m_)));
  apply_factors(out_f_, m_, m_, t, m_, y, nullptr, out_vec_, bias_, batch,
                reinterpret_cast<void*>(stream));
}

void CudaPlan::forward(const float* x, float* y, int batch, uintptr_t stream) {
  if (batch <= 0) return;
  DeviceGuard guard(device_);
  float* ws = workspace(size_t(batch) * (npad_ + m_ + 2 * std::max(n_, m_)));
  float* z = ws;
  float* t = ws + size_t(batch) * npad_;
  transform_in(x, z, batch, stream);
  matmul(z, t, batch, stream);
  transform_out(t, y, batch, stream);
}

void CudaPlan::run_host(const std::string& stage, const float* in, float* out, int batch) {
  if (batch <= 0) return;
  DeviceGuard guard(device_);
  size_t in_w, out_w;
  if (stage == "forward") in_w = n_, out_w = m_;
  else if (stage == "transform_in") in_w = n_, out_w = npad_;
  else if (stage == "matmul") in_w = npad_, out_w = m_;
  else if (stage == "transform_out") in_w = m_, out_w = m_;
  else throw std::invalid_argument("unknown stage " + stage);
  float *din = nullptr, *dout = nullptr;
  QUIPC_CUDA_CHECK(cudaMalloc(&din, sizeof(float) * batch * in_w));
  QUIPC_CUDA_CHECK(cudaMalloc(&dout, sizeof(float) * batch * out_w));
  try {
    QUIPC_CUDA_CHECK(cudaMemcpy(din, in, sizeof(float) * batch * in_w, cudaMemcpyHostToDevice));
    if (stage == "forward") forward(din, dout, batch, 0);
    else if (stage == "transform_in") transform_in(din, dout, batch, 0);
    else if (stage == "matmul") matmul(din, dout, batch, 0);
    else transform_out(din, dout, batch, 0);
    QUIPC_CUDA_CHECK(cudaMemcpy(out, dout, sizeof(float) * batch * out_w, cudaMemcpyDeviceToHost));
  } catch (...) {
    cudaFree(din);
    cudaFree(dout);
    throw;
  }
  cudaFree(din);
  cudaFree(dout);
}

double CudaPlan::benchmark(const std::string& what, int batch, int iters) {
  if (what != "forward" && what != "matmul") throw std::invalid_argument("benchmark: forward or matmul");
  if (batch < 1 || iters < 1) throw std::invalid_argument("benchmark: batch and iters must be positive");
  DeviceGuard guard(device_);
  std::vector<float> host(size_t(batch) * npad_, 0.f);
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  for (int b = 0; b < batch; ++b)
    for (int j = 0; j < n_; ++j) host[size_t(b) * npad_ + j] = dist(rng);
  float *x = nullptr, *y = nullptr;
  QUIPC_CUDA_CHECK(cudaMalloc(&x, sizeof(float) * host.size()));
  QUIPC_CUDA_CHECK(cudaMalloc(&y, sizeof(float) * size_t(batch) * m_));
  QUIPC_CUDA_CHECK(cudaMemcpy(x, host.data(), sizeof(float) * host.size(), cudaMemcpyHostToDevice));
  cudaStream_t stream;
  QUIPC_CUDA_CHECK(cudaStreamCreate(&stream));
  auto step = [&] {
    if (what == "forward") forward(x, y, batch, uintptr_t(stream));
    else matmul(x, y, batch, uintptr_t(stream));  // x holds a zero-padded z
  };
  for (int i = 0; i < 3; ++i) step();
  cudaEvent_t start, stop;
  QUIPC_CUDA_CHECK(cudaEventCreate(&start));
  QUIPC_CUDA_CHECK(cudaEventCreate(&stop));
  QUIPC_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < iters; ++i) step();
  QUIPC_CUDA_CHECK(cudaEventRecord(stop, stream));
  QUIPC_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.f;
  QUIPC_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  cudaFree(x);
  cudaFree(y);
  return double(ms) / iters;
}

}  // namespace cuda
}  // namespace quipc
