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

// The node attributes the kernel reads.
struct NodeSpec {
  bool group = false;
  CodeFormat format = CodeFormat::kGrid;
  int bits = 0;
  int n = 0;                     // in_features
  std::vector<int> out_split;    // out_features per part (one part for QuipLinear)
  bool in_identity = false;      // QuipLinear: in_transform == "identity" (no input factors)
  int accuracy_level = 0;        // >= 4: int8 activations in the 4-bit GEMVs (as MatMulNBits')
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
};

}  // namespace quipc
