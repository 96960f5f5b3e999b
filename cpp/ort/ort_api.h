// Typed calls into onnxruntime's OrtApi table (ort_abi.h). A failing call throws ort::Error
// with onnxruntime's message; the C entry points (custom_ops.cpp) turn every exception into
// an OrtStatus, so none crosses into onnxruntime.
#pragma once
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ort_abi.h"

namespace ort {

struct Error : std::runtime_error {
  Error(int code, const std::string& msg) : std::runtime_error(msg), code(code) {}
  int code;
};

// An invalid-argument error (bad node inputs or attributes).
inline Error invalid(const std::string& msg) { return Error(kOrtInvalidArgument, msg); }

// A tensor's element type, shape and data (not owned).
struct Tensor {
  int type = kOrtUndefined;
  std::vector<int64_t> shape;
  void* data = nullptr;
  int rank() const { return int(shape.size()); }
  int64_t dim(int i) const { return shape[size_t(i)]; }
  int64_t count() const;
  std::string describe() const;  // e.g. "float16 (64, 48)"
};

const char* type_name(int type);

class Api {
 public:
  explicit Api(const OrtApi* api) : api_(api) {}

  OrtStatus* status(int code, const std::string& msg) const;
  // A status made and read back through the table (CreateStatus, GetErrorCode,
  // GetErrorMessage, ReleaseStatus): false when the table is not laid out as ort_abi.h says.
  bool status_round_trip() const;
  Tensor tensor(const OrtValue* value) const;

  // Kernel creation (OrtKernelInfo).
  size_t input_count(const OrtKernelInfo* info) const;
  bool has_attr_string(const OrtKernelInfo* info, const char* name) const;
  std::string attr_string(const OrtKernelInfo* info, const char* name) const;
  int64_t attr_int(const OrtKernelInfo* info, const char* name) const;
  int64_t attr_int_or(const OrtKernelInfo* info, const char* name, int64_t fallback) const;  // absent: fallback
  std::vector<int64_t> attr_ints(const OrtKernelInfo* info, const char* name) const;
  std::string node_name(const OrtKernelInfo* info) const;
  // The input's value when it is a constant initializer, else nullptr.
  const OrtValue* constant_input(const OrtKernelInfo* info, size_t index) const;

  // Kernel calls (OrtKernelContext).
  size_t input_count(const OrtKernelContext* ctx) const;
  size_t output_count(const OrtKernelContext* ctx) const;
  const OrtValue* input(const OrtKernelContext* ctx, size_t index) const;
  float* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape) const;
  // fn(0..n-1) on onnxruntime's intra-op pool.
  void parallel_for(const OrtKernelContext* ctx, int n, const std::function<void(int)>& fn) const;

  // Registration (OrtSessionOptions).
  std::string session_config(const OrtSessionOptions* options, const char* key) const;  // "" if unset
  void add_domain(OrtSessionOptions* options, const char* domain,
                  const std::vector<const OrtCustomOp*>& ops) const;

 private:
  void check(OrtStatus* s) const;  // throws Error(message) and releases s
  bool ok(OrtStatus* s) const;     // false (and releases s) on an error status
  template <class Fn>
  Fn fn(Slot s) const { return slot<Fn>(api_, s); }

  const OrtApi* api_;
};

}  // namespace ort
