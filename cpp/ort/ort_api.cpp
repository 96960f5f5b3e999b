#include "ort_api.h"

#include <atomic>

namespace ort {

int64_t Tensor::count() const {
  int64_t c = 1;
  for (int64_t d : shape) c *= d;
  return c;
}

const char* type_name(int type) {
  switch (type) {
    case kOrtFloat: return "float32";
    case kOrtUint8: return "uint8";
    case kOrtFloat16: return "float16";
    default: return "another type";
  }
}

std::string Tensor::describe() const {
  std::string s = std::string(type_name(type)) + " (";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

void Api::check(OrtStatus* s) const {
  if (s == nullptr) return;
  const int code = fn<int (*)(const OrtStatus*)>(kGetErrorCode)(s);
  std::string msg = fn<const char* (*)(const OrtStatus*)>(kGetErrorMessage)(s);
  fn<void (*)(OrtStatus*)>(kReleaseStatus)(s);
  throw Error(code, msg);
}

bool Api::ok(OrtStatus* s) const {
  if (s == nullptr) return true;
  fn<void (*)(OrtStatus*)>(kReleaseStatus)(s);
  return false;
}

OrtStatus* Api::status(int code, const std::string& msg) const {
  return fn<OrtStatus* (*)(int, const char*)>(kCreateStatus)(code, msg.c_str());
}

bool Api::status_round_trip() const {
  const char* probe = "quipc probe";
  OrtStatus* s = status(kOrtInvalidArgument, probe);
  if (s == nullptr) return false;
  const bool same = fn<int (*)(const OrtStatus*)>(kGetErrorCode)(s) == kOrtInvalidArgument &&
                    std::string(fn<const char* (*)(const OrtStatus*)>(kGetErrorMessage)(s)) == probe;
  fn<void (*)(OrtStatus*)>(kReleaseStatus)(s);
  return same;
}

Tensor Api::tensor(const OrtValue* value) const {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(fn<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(
      value, &info));
  Tensor t;
  size_t rank = 0;
  OrtStatus* s = fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(kGetTensorElementType)(
      info, &t.type);
  if (s == nullptr)
    s = fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, &rank);
  if (s == nullptr) {
    t.shape.resize(rank);
    s = fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(
        info, t.shape.data(), rank);
  }
  fn<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  check(s);
  // Read-only use: the OrtValue is an input; GetTensorMutableData is the call API 18 has.
  check(fn<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(const_cast<OrtValue*>(value),
                                                                    &t.data));
  return t;
}

size_t Api::input_count(const OrtKernelInfo* info) const {
  size_t n = 0;
  check(fn<OrtStatus* (*)(const OrtKernelInfo*, size_t*)>(kKernelInfoGetInputCount)(info, &n));
  return n;
}

bool Api::has_attr_string(const OrtKernelInfo* info, const char* name) const {
  size_t size = 0;
  return ok(fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, char*, size_t*)>(
      kKernelInfoGetAttributeString)(info, name, nullptr, &size));
}

std::string Api::attr_string(const OrtKernelInfo* info, const char* name) const {
  auto get = fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, char*, size_t*)>(
      kKernelInfoGetAttributeString);
  size_t size = 0;
  check(get(info, name, nullptr, &size));  // size with the terminating zero
  std::string s(size, '\0');
  check(get(info, name, &s[0], &size));
  s.resize(size ? size - 1 : 0);
  return s;
}

int64_t Api::attr_int(const OrtKernelInfo* info, const char* name) const {
  int64_t v = 0;
  OrtStatus* s = fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(
      kKernelInfoGetAttributeInt64)(info, name, &v);
  if (s != nullptr) {
    ok(s);
    throw invalid(std::string("the node has no integer attribute '") + name + "'");
  }
  return v;
}

int64_t Api::attr_int_or(const OrtKernelInfo* info, const char* name, int64_t fallback) const {
  int64_t v = 0;
  return ok(fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(
             info, name, &v)) ? v : fallback;
}

std::vector<int64_t> Api::attr_ints(const OrtKernelInfo* info, const char* name) const {
  auto get = fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*, size_t*)>(
      kKernelInfoGetAttributeArrayInt64);
  size_t size = 0;
  if (!ok(get(info, name, nullptr, &size)))
    throw invalid(std::string("the node has no integer list attribute '") + name + "'");
  std::vector<int64_t> v(size);
  if (size) check(get(info, name, v.data(), &size));
  return v;
}

std::string Api::node_name(const OrtKernelInfo* info) const {
  auto get = fn<OrtStatus* (*)(const OrtKernelInfo*, char*, size_t*)>(kKernelInfoGetNodeName);
  size_t size = 0;
  if (!ok(get(info, nullptr, &size))) return "?";
  std::string s(size, '\0');
  if (!ok(get(info, &s[0], &size))) return "?";
  s.resize(size ? size - 1 : 0);
  return s;
}

const OrtValue* Api::constant_input(const OrtKernelInfo* info, size_t index) const {
  int is_constant = 0;
  const OrtValue* v = nullptr;
  check(fn<OrtStatus* (*)(const OrtKernelInfo*, size_t, int*, const OrtValue**)>(
      kKernelInfoGetConstantInputTensor)(info, index, &is_constant, &v));
  return is_constant ? v : nullptr;
}

size_t Api::input_count(const OrtKernelContext* ctx) const {
  size_t n = 0;
  check(fn<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContextGetInputCount)(ctx, &n));
  return n;
}

size_t Api::output_count(const OrtKernelContext* ctx) const {
  size_t n = 0;
  check(fn<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContextGetOutputCount)(ctx, &n));
  return n;
}

const OrtValue* Api::input(const OrtKernelContext* ctx, size_t index) const {
  const OrtValue* v = nullptr;
  check(fn<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput)(
      ctx, index, &v));
  if (v == nullptr) throw invalid("input " + std::to_string(index) + " is missing");
  return v;
}

float* Api::output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape) const {
  OrtValue* v = nullptr;
  check(fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
      kKernelContextGetOutput)(ctx, index, shape.data(), shape.size(), &v));
  void* data = nullptr;
  check(fn<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(v, &data));
  return static_cast<float*>(data);
}

namespace {

struct ForCall {
  const std::function<void(int)>* fn;
  std::atomic<bool> failed{false};
};

void run_index(void* data, size_t i) {
  auto* call = static_cast<ForCall*>(data);
  try {
    (*call->fn)(int(i));
  } catch (...) {  // never into onnxruntime's thread pool
    call->failed = true;
  }
}

}  // namespace

void Api::parallel_for(const OrtKernelContext* ctx, int n, const std::function<void(int)>& f) const {
  ForCall call;
  call.fn = &f;
  check(fn<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
      kKernelContextParallelFor)(ctx, &run_index, size_t(n), 0, &call));
  if (call.failed) throw Error(kOrtFail, "a quipc kernel failed on onnxruntime's thread pool");
}

std::string Api::session_config(const OrtSessionOptions* options, const char* key) const {
  auto get = fn<OrtStatus* (*)(const OrtSessionOptions*, const char*, char*, size_t*)>(
      kGetSessionConfigEntry);
  size_t size = 0;
  if (!ok(get(options, key, nullptr, &size))) return "";
  std::string s(size, '\0');
  check(get(options, key, &s[0], &size));
  s.resize(size ? size - 1 : 0);
  return s;
}

void Api::add_domain(OrtSessionOptions* options, const char* domain,
                     const std::vector<const OrtCustomOp*>& ops) const {
  OrtCustomOpDomain* d = nullptr;
  check(fn<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(domain, &d));
  for (const OrtCustomOp* op : ops)
    check(fn<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(kCustomOpDomainAdd)(d, op));
  // The domain must outlive every session made from these options: it is never released.
  check(fn<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options, d));
}

}  // namespace ort
