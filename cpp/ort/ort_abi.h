// The part of onnxruntime's C ABI that the quipc custom-op library uses, declared here
// because the onnxruntime wheel ships no C headers. Written for this project from
// onnxruntime's public header include/onnxruntime/core/session/onnxruntime_c_api.h
// (ORT_API_VERSION 30, onnxruntime 1.30; read, not copied): the entry point OrtApiBase,
// the OrtCustomOp struct (all 25 callbacks, in the header's order) and the slot index of
// each OrtApi function called. OrtApi is append-only: a function keeps its slot in every
// later version, and a runtime that returns the table for version V has every slot up to
// the last function added in V. Each slot index is the function's position in struct OrtApi
// (field offset / 8 on 64-bit targets), taken from a binding generated from that header and
// checked against the neighbouring declarations in the header itself. RegisterCustomOps
// round-trips a status through the table at every registration, and
// tests/test_ort_custom_ops.py runs the code calling each of the others (onnxruntime 1.32).
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {

struct OrtApi;  // opaque here: read through ort::slot()
struct OrtStatus;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtShapeInferContext;

// ONNXTensorElementDataType (TensorProto.DataType numbering): the values used here.
enum OrtElementType : int {
  kOrtUndefined = 0,
  kOrtFloat = 1,
  kOrtUint8 = 2,
  kOrtFloat16 = 10,
};

// OrtErrorCode: the values used here.
enum OrtErrorCodeValue : int {
  kOrtFail = 1,
  kOrtInvalidArgument = 2,
  kOrtNotImplemented = 9,
};

// OrtCustomOpInputOutputCharacteristic.
enum OrtIoCharacteristic : int { kOrtRequired = 0, kOrtOptional = 1, kOrtVariadic = 2 };

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);  // nullptr when the runtime lacks `version`
  const char* (*GetVersionString)();
};

// struct OrtCustomOp: `version` says which of the later fields onnxruntime may read.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  int (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  int (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  int (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  int (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);  // OrtMemType
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* ctx);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

namespace ort {

// The OrtApi version this library asks for: onnxruntime 1.18, the floor pyproject allows.
// Every slot below and the OrtCustomOp fields up to GetEndVersion exist in it.
constexpr uint32_t kApiVersion = 18;

// Slot index in struct OrtApi of each function called.
enum Slot : size_t {
  kCreateStatus = 0,
  kGetErrorCode = 1,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelInfoGetAttributeString = 87,
  kKernelContextGetInputCount = 88,
  kKernelContextGetOutputCount = 89,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelInfoGetAttributeArrayInt64 = 163,
  kKernelInfoGetInputCount = 230,
  kGetSessionConfigEntry = 238,
  kKernelInfoGetNodeName = 244,
  kKernelInfoGetConstantInputTensor = 249,
  kKernelContextParallelFor = 274,
};

// The function in `slot` of the table, as type Fn.
template <class Fn>
Fn slot(const OrtApi* api, Slot s) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[s]);
}

}  // namespace ort
