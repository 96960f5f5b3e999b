// libquipc_ort: quipc's C++ kernels as onnxruntime custom ops. onnxruntime calls
// RegisterCustomOps (SessionOptions.register_custom_ops_library), which adds the domain
// ai.quipc with QuipLinear and QuipLinearGroup for the CPU execution provider. Inputs:
// x (float32, any rank, last axis in_features), then the node's weights as one
// heterogeneous variadic input (quip_node.h reads them); outputs: float32, one per part.
// Weights that are constant initializers are prepared once, at session creation.
// Parallel regions run on onnxruntime's intra-op pool (KernelContext_ParallelFor), split in
// up to `threads` parts: the session config entry "quipc.threads", else the CPU count.
// Test hook: the environment variable QUIPC_ORT_API_VERSION overrides the API version asked for.
#include <climits>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../thread_pool.h"
#include "ort_api.h"
#include "quip_node.h"

using quipc::NodeSpec;
using quipc::QuipNode;

namespace {

constexpr const char* kDomain = "ai.quipc";
constexpr const char* kThreadsKey = "quipc.threads";

// An op as registered: the OrtCustomOp first (onnxruntime hands back its address).
struct OpDef {
  OrtCustomOp op;
  bool group;
  int threads;
  const OrtApi* api;
};

const OpDef& def_of(const OrtCustomOp* op) { return *reinterpret_cast<const OpDef*>(op); }

struct Kernel {
  ort::Api api;
  NodeSpec spec;
  int threads;
  std::unique_ptr<QuipNode> node;  // null when a weight is not a constant initializer
};

OrtStatus* to_status(const ort::Api& api, const std::exception& e) {
  const auto* err = dynamic_cast<const ort::Error*>(&e);
  return api.status(err ? err->code : kOrtFail, e.what());
}

quipc::CodeFormat parse_format(const std::string& f, const std::string& node) {
  if (f == "grid") return quipc::CodeFormat::kGrid;
  if (f == "e8p") return quipc::CodeFormat::kE8P;
  if (f == "trellis") return quipc::CodeFormat::kTrellis;
  if (f == "trellis256") return quipc::CodeFormat::kTrellis256;
  throw ort::invalid("quipc node '" + node + "': code format '" + f +
                     "' has no custom-op kernel; run the file without the quipc library");
}

NodeSpec read_spec(const ort::Api& api, const OrtKernelInfo* info, bool group) {
  NodeSpec s;
  s.group = group;
  s.name = api.node_name(info);
  s.format = parse_format(api.has_attr_string(info, "format") ? api.attr_string(info, "format") : "grid", s.name);
  s.bits = int(api.attr_int(info, "bits"));
  s.n = int(api.attr_int(info, "in_features"));
  s.accuracy_level = int(api.attr_int_or(info, "accuracy_level", 0));
  const int64_t m = api.attr_int(info, "out_features");
  if (group) {
    int64_t total = 0;
    for (int64_t v : api.attr_ints(info, "out_split")) {
      if (v < 1) throw ort::invalid("quipc node '" + s.name + "': out_split values must be positive");
      s.out_split.push_back(int(v));
      total += v;
    }
    if (total != m || s.out_split.empty())
      throw ort::invalid("quipc node '" + s.name + "': out_split does not add up to out_features");
  } else {
    s.out_split = {int(m)};
    s.in_identity = api.has_attr_string(info, "in_transform") &&
                    api.attr_string(info, "in_transform") == "identity";
  }
  if (s.bits < 2 || s.bits > 4 || s.n < 1 || m < 1)
    throw ort::invalid("quipc node '" + s.name + "': bits must be 2, 3 or 4 and the features positive");
  return s;
}

std::vector<ort::Tensor> weight_tensors(const ort::Api& api, const OrtKernelContext* ctx) {
  std::vector<ort::Tensor> w;
  for (size_t i = 1; i < api.input_count(ctx); ++i) w.push_back(api.tensor(api.input(ctx, i)));
  return w;
}

OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) {
  const OpDef& def = def_of(op);
  ort::Api api(def.api);
  try {
    auto k = std::make_unique<Kernel>(Kernel{api, read_spec(api, info, def.group), def.threads, nullptr});
    std::vector<ort::Tensor> w;
    bool constant = true;
    for (size_t i = 1; constant && i < api.input_count(info); ++i) {
      const OrtValue* v = api.constant_input(info, i);
      if (v != nullptr) w.push_back(api.tensor(v));
      constant = v != nullptr;
    }
    if (constant) k->node = std::make_unique<QuipNode>(k->spec, w);
    *out = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(api, e);
  }
}

struct PoolContext {
  const ort::Api* api;
  const OrtKernelContext* ctx;
};

void ort_parallel_for(void* c, int n, const std::function<void(int)>& fn) {
  auto* pc = static_cast<PoolContext*>(c);
  pc->api->parallel_for(pc->ctx, n, fn);
}

void compute(Kernel& k, OrtKernelContext* ctx) {
  const ort::Api& api = k.api;
  const ort::Tensor x = api.tensor(api.input(ctx, 0));
  if (x.type != kOrtFloat || x.rank() < 1 || x.dim(x.rank() - 1) != k.spec.n)
    throw ort::invalid("quipc node '" + k.spec.name + "': x is " + x.describe() +
                       ", expected float32 with last axis " + std::to_string(k.spec.n));
  const int64_t rows = x.count() / k.spec.n;
  if (rows > (int64_t(1) << 30)) throw ort::invalid("quipc node '" + k.spec.name + "': too many rows");
  std::unique_ptr<QuipNode> local;
  if (!k.node) local = std::make_unique<QuipNode>(k.spec, weight_tensors(api, ctx));
  const QuipNode& node = k.node ? *k.node : *local;
  if (api.output_count(ctx) != size_t(node.parts()))
    throw ort::invalid("quipc node '" + k.spec.name + "' has " + std::to_string(api.output_count(ctx)) +
                       " outputs, its out_split " + std::to_string(node.parts()));
  std::vector<float*> ys;
  for (int p = 0; p < node.parts(); ++p) {
    std::vector<int64_t> shape(x.shape.begin(), x.shape.end() - 1);
    shape.push_back(node.m(p));
    ys.push_back(api.output(ctx, size_t(p), shape));
  }
  PoolContext pc{&api, ctx};
  const quipc::ExternalPool pool{&ort_parallel_for, &pc};
  quipc::ScopedExternalPool scope(&pool);
  node.forward(static_cast<const float*>(x.data), int(rows), ys, k.threads);
}

OrtStatus* compute_kernel(void* kernel, OrtKernelContext* ctx) {
  Kernel& k = *static_cast<Kernel*>(kernel);
  try {
    compute(k, ctx);
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(k.api, e);
  }
}

void destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* op_name(const OrtCustomOp* op) { return def_of(op).group ? "QuipLinearGroup" : "QuipLinear"; }
const char* cpu_provider(const OrtCustomOp*) { return nullptr; }  // nullptr: the CPU provider
int input_type(const OrtCustomOp*, size_t i) { return i == 0 ? kOrtFloat : kOrtUndefined; }
size_t two(const OrtCustomOp*) { return 2; }
size_t one(const OrtCustomOp*) { return 1; }
int output_type(const OrtCustomOp*, size_t) { return kOrtFloat; }
int input_characteristic(const OrtCustomOp*, size_t i) { return i == 0 ? kOrtRequired : kOrtVariadic; }
int output_characteristic(const OrtCustomOp* op, size_t) {
  return def_of(op).group ? kOrtVariadic : kOrtRequired;
}
int default_memory(const OrtCustomOp*, size_t) { return 0; }  // OrtMemTypeDefault
int arity_one(const OrtCustomOp*) { return 1; }
int heterogeneous(const OrtCustomOp*) { return 0; }
int homogeneous(const OrtCustomOp*) { return 1; }

OpDef* new_op(bool group, int threads, const OrtApi* api) {
  // Lives as long as the process: sessions made from these options keep pointing at it.
  auto* d = new OpDef{};
  OrtCustomOp& op = d->op;
  op.version = ort::kApiVersion;
  op.GetName = &op_name;
  op.GetExecutionProviderType = &cpu_provider;
  op.GetInputType = &input_type;
  op.GetInputTypeCount = &two;
  op.GetOutputType = &output_type;
  op.GetOutputTypeCount = &one;
  op.KernelDestroy = &destroy_kernel;
  op.GetInputCharacteristic = &input_characteristic;
  op.GetOutputCharacteristic = &output_characteristic;
  op.GetInputMemoryType = &default_memory;
  op.GetVariadicInputMinArity = &arity_one;
  op.GetVariadicInputHomogeneity = &heterogeneous;
  op.GetVariadicOutputMinArity = &arity_one;
  op.GetVariadicOutputHomogeneity = &homogeneous;
  op.CreateKernelV2 = &create_kernel;
  op.KernelComputeV2 = &compute_kernel;
  d->group = group;
  d->threads = threads;
  d->api = api;
  return d;
}

uint32_t requested_version() {
  const char* env = std::getenv("QUIPC_ORT_API_VERSION");
  return env && *env ? uint32_t(std::strtoul(env, nullptr, 10)) : ort::kApiVersion;
}

int thread_count(const ort::Api& api, OrtSessionOptions* options) {
  const std::string v = api.session_config(options, kThreadsKey);
  const int t = v.empty() ? int(std::thread::hardware_concurrency()) : std::atoi(v.c_str());
  return t < 1 ? 1 : (t > 256 ? 256 : t);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(
    OrtSessionOptions* options, const OrtApiBase* base) {
  const uint32_t want = requested_version();
  const OrtApi* api = base->GetApi(want);
  if (api == nullptr) {  // an older runtime: any table it has can still make the error
    const OrtApi* any = nullptr;
    for (uint32_t v = want; v > 1 && any == nullptr; --v) any = base->GetApi(v - 1);
    if (any == nullptr) return nullptr;  // unreachable: every runtime has version 1
    return ort::Api(any).status(
        kOrtNotImplemented,
        "the quipc custom-op library needs onnxruntime C API version " + std::to_string(want) +
            " (onnxruntime >= 1." + std::to_string(want) + "); this onnxruntime is " +
            base->GetVersionString() + ". Upgrade onnxruntime, or run without the library "
            "(the model's function bodies run in any onnxruntime)");
  }
  ort::Api a(api);
  if (!a.status_round_trip())
    return a.status(kOrtFail, "the quipc custom-op library does not match this onnxruntime's C API table");
  try {
    const int threads = thread_count(a, options);
    a.add_domain(options, kDomain, {&new_op(false, threads, api)->op, &new_op(true, threads, api)->op});
    return nullptr;
  } catch (const std::exception& e) {
    return to_status(a, e);
  }
}
