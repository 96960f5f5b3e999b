// Host interface of the CUDA path (no CUDA headers: included by the pybind11 TU).
// A CudaPlan owns device copies of one layer; its methods launch on a caller's stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../code_format.h"

namespace quipc {
namespace cuda {

struct HostFactor {
  int order = 1;
  bool fwht = false;
  std::vector<float> mat;  // order x order (empty for fwht)
};

struct HostLayer {
  // grid: scale, zero per row; e8p: scale (m, stages), no zero; trellis: scale (m), no zero
  CodeFormat format = CodeFormat::kGrid;
  int m = 0, n = 0, bits = 0;
  const uint8_t* codes = nullptr;  // m x row_bytes (host)
  size_t row_bytes = 0;
  std::vector<float> scale, zero, in_scale, out_scale, bias;
  std::vector<HostFactor> in_factors, out_factors;  // out_factors already transposed
};

int device_count();
std::string device_name(int device);

class CudaPlan {
 public:
  CudaPlan(int device, const HostLayer& layer);
  ~CudaPlan();
  CudaPlan(const CudaPlan&) = delete;
  CudaPlan& operator=(const CudaPlan&) = delete;

  int m() const { return m_; }
  int n() const { return n_; }
  int padded_n() const { return npad_; }
  int device() const { return device_; }

  // Device pointers, row-major float32: x (B x n) -> y (B x m).
  void forward(const float* x, float* y, int batch, uintptr_t stream);
  // z (B x padded_n, zero padded) = K_in (in_scale * x).
  void transform_in(const float* x, float* z, int batch, uintptr_t stream);
  // t (B x m) = W' z.
  void matmul(const float* z, float* t, int batch, uintptr_t stream);
  // y = out_scale * K_out^T t + bias (t is left unchanged).
  void transform_out(const float* t, float* y, int batch, uintptr_t stream);
  // Host-memory convenience for tests (copies in, runs on the default stream, copies
  // out): stage is "forward", "transform_in", "matmul" or "transform_out".
  void run_host(const std::string& stage, const float* in, float* out, int batch);
  // Milliseconds per call of forward ("forward") or matmul ("matmul") on random data,
  // timed with CUDA events over `iters` back-to-back launches (no Python in the loop).
  double benchmark(const std::string& what, int batch, int iters);

 private:
  struct DevFactor {
    int order;
    bool fwht;
    float* mat;
  };
  void apply_factors(const std::vector<DevFactor>& fs, int width, int ld_out, const float* src,
                     int ld_src, float* dst, const float* pre_scale, const float* post_scale,
                     const float* bias, int batch, void* stream);
  float* workspace(size_t floats);
  void release();

  CodeFormat format_;
  int device_, m_, n_, bits_, npad_;
  size_t row_bytes_;
  uint8_t* codes_ = nullptr;
  float *scale_ = nullptr, *zero_ = nullptr, *in_vec_ = nullptr, *out_vec_ = nullptr,
        *bias_ = nullptr, *tables_ = nullptr;  // tables_: e8p / trellis codebooks
  std::vector<DevFactor> in_f_, out_f_;
  float* work_ = nullptr;
  size_t work_floats_ = 0;
};

}  // namespace cuda
}  // namespace quipc
