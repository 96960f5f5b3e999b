// One decoder block of the Llama-style families (llama, mistral, qwen2, qwen3, phi3, gemma2,
// gemma3) at decode time, one token, in one call: RMSNorm, q/k/v (QuipLinearPlan: transforms, signs,
// scales, biases and the quantized GEMV), the per-head q/k RMSNorm (Qwen3, Gemma3), rotary
// embedding, the KV cache write, grouped-query attention over positions [0, pos] (or the last
// `window` of them; Gemma2 soft-caps the scores), o, [post-attention RMSNorm (Gemma2/3)], residual, RMSNorm, gate and up,
// act(gate) * up (SiLU, or GELU's tanh form), down, [post-MLP RMSNorm (Gemma2/3)], residual.
// What transformers computes for the block, without the ~40 framework ops around its seven
// GEMVs (runtime/quipc_runtime/kernels_lm.py drives it). Gemma's RMSNorm scales by (1 + w):
// the caller passes 1 + w.
#pragma once
#include <vector>

#include "quip_linear.h"

namespace quipc {

constexpr int kMaxHeadDim = 1024;   // a head's scratch row lives on the stack

enum class MlpActivation { kSilu, kGeluTanh };

struct DecoderLayerShape {
  int hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0;
  float eps1 = 0.f, eps2 = 0.f;  // input / post-attention RMSNorm epsilons
  float qk_eps = 0.f;            // the per-head q/k norms' epsilon (Qwen3)
  float scaling = 0.f;           // attention logit scale (head_dim^-0.5, Gemma3: query_pre_attn_scalar^-0.5)
  int window = 0;                // sliding-window attention over the last `window` positions; 0: all
  MlpActivation act = MlpActivation::kSilu;
  float post_eps = 0.f;          // the post-attention / post-MLP norms' epsilon (Gemma2/3)
  float attn_softcap = 0.f;      // attention logit soft-capping (Gemma2); 0: none
};

struct DecoderLayerWeights {
  std::vector<float> ln1, ln2;        // (hidden) each
  std::vector<float> q_norm, k_norm;  // (head_dim) each, or both empty
  std::vector<float> post_attn, post_mlp;  // (hidden) each, or both empty: norms of the attention's
                                           // and the MLP's outputs before their residual adds
  // k and v null: q is the fused qkv_proj (q, k, v rows stacked, Phi-3); gate null: up is the
  // fused gate_up_proj (gate rows, then up rows)
  const QuipLinearPlan *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  const QuipLinearPlan *gate = nullptr, *up = nullptr, *down = nullptr;
};

class DecoderLayer {
 public:
  // Throws std::invalid_argument when the plans' shapes do not fit the block's shape.
  DecoderLayer(DecoderLayerShape shape, DecoderLayerWeights weights);
  // Not copyable: the groups' output pointers point into this object's own buffers.
  DecoderLayer(const DecoderLayer&) = delete;
  DecoderLayer& operator=(const DecoderLayer&) = delete;

  const DecoderLayerShape& shape() const { return s_; }
  // Whether q / k / v, and gate / up, run as one group (QuipLinearPlan::forward_group): separate
  // plans that share their input side.
  bool qkv_grouped() const { return !qkv_group_.empty(); }
  bool gate_up_grouped() const { return !gate_up_group_.empty(); }

  // h (hidden) is updated in place. k_cache / v_cache: (kv_heads, capacity, head_dim), the
  // token's key and value are written at `pos`, positions [0, pos) must hold the earlier
  // tokens'. cos / sin: the rotary table rows at `pos` (head_dim each), sin with
  // rotate_half's sign folded in (its first half negated). Not reentrant (scratch buffers).
  void step(float* h, int pos, float* k_cache, float* v_cache, int capacity, const float* cos,
            const float* sin, int threads, bool force_scalar) const;

 private:
  void attend(int pos, const float* k_cache, const float* v_cache, int capacity, int threads,
              bool force_scalar) const;
  // h += out_, or h += post_norm(out_) where the block has that norm (x_ as scratch)
  void add_residual(float* h, const std::vector<float>& post_norm) const;

  DecoderLayerShape s_;
  DecoderLayerWeights w_;
  std::vector<const QuipLinearPlan*> qkv_group_, gate_up_group_;  // empty: the plans run one by one
  mutable std::vector<float> x_, qkv_, attn_, gu_, scores_, out_;
  std::vector<float*> qkv_out_, gate_up_out_;  // the groups' outputs: q, k, v in qkv_; gate, up in gu_
};

// y = x * rsqrt(mean(x^2) + eps) * w over n values (transformers' RMSNorm in float32).
void rms_norm(const float* x, const float* w, int n, float eps, float* y);

}  // namespace quipc
