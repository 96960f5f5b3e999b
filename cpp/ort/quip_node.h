// One ai.quipc QuipLinear or QuipLinearGroup node as quipc's C++ plans
// (quip_linear.h): the node's weight inputs (quipc.backends.onnx.variants: codes, scale,
// [zero], [in_scale], [out_sign_bits], transform factors, [bias], per part for a group)
// read by element type and rank, converted once, and run on the same kernels as
// quipc_runtime's C++ backend.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "../quip_linear.h"
#include "ort_api.h"

namespace quipc {

// Whether a node's decode GEMVs take int8 activations (LayerData::int8_activations), from its
// accuracy_level, MatMulNBits' "minimum accuracy of the activations": 1-3 (fp32, fp16, bf16)
// keep them fp32, 4 (int8) quantizes them, and 0, "unset", leaves the choice to the kernel,
// which takes int8: relative error ~1e-3 on a layer's output, teacher-forced decode perplexity
// of SmolLM2 +0.09 % (the w2 default), -0.05 % (w4 grid), and decode 7.8 instead of 10.5 ms a
// token (w2) on the AMD host of stop 60 (docs/results/onnx.md). Stock onnxruntime runs the same
// node's function body at 0 on fp32 activations (its MatMulNBits' choice for unset).
inline bool int8_activations_at(int accuracy_level) { return accuracy_level == 0 || accuracy_level >= 4; }

// The node attributes the kernel reads.
struct NodeSpec {
  bool group = false;
  CodeFormat format = CodeFormat::kGrid;
  int bits = 0;
  int n = 0;                     // in_features
  std::vector<int> out_split;    // out_features per part (one part for QuipLinear)
  bool in_identity = false;      // QuipLinear: in_transform == "identity" (no input factors)
  int accuracy_level = 0;        // MatMulNBits' attribute; see int8_activations_at
  std::string name;              // node name, for errors
};

class QuipNode {
 public:
  // weights: inputs 1.. of the node (input 0 is x). Their data must outlive the node.
  QuipNode(const NodeSpec& spec, const std::vector<ort::Tensor>& weights);

  int n() const { return spec_.n; }
  int parts() const { return int(plans_.size()); }
  int m(int part) const { return plans_[size_t(part)]->m(); }
  // ys[p] (rows x m(p)) = part p of the node applied to x (rows x n).
  void forward(const float* x, int rows, const std::vector<float*>& ys, int threads) const;

 private:
  NodeSpec spec_;
  std::vector<std::unique_ptr<QuipLinearPlan>> plans_;  // one per part, same input side
  std::vector<const QuipLinearPlan*> parts_;            // the same, as matmul_group takes them
};

}  // namespace quipc
