#include "decoder_layer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention.h"
#include "thread_pool.h"

namespace quipc {

void rms_norm(const float* x, const float* w, int n, float eps, float* y) {
  float ss = 0.f;
  for (int j = 0; j < n; ++j) ss += x[j] * x[j];
  const float r = 1.f / std::sqrt(ss / float(n) + eps);
  for (int j = 0; j < n; ++j) y[j] = w[j] * (x[j] * r);
}

namespace {

void expect_plan(const QuipLinearPlan* p, const char* name, int m, int n) {
  if (p == nullptr) throw std::invalid_argument(std::string("decoder layer: no plan for ") + name);
  if (p->m() != m || p->n() != n)
    throw std::invalid_argument(std::string("decoder layer: ") + name + " is " + std::to_string(p->m()) +
                                "x" + std::to_string(p->n()) + ", the block needs " +
                                std::to_string(m) + "x" + std::to_string(n));
}

// x (head_dim) rotated in place: x * cos + rotate_half(x) * sin, sin's first half negated.
void rotate(float* x, const float* cos, const float* sin, int d, float* tmp) {
  const int half = d / 2;
  for (int j = 0; j < d; ++j) tmp[j] = x[j] * cos[j] + x[j < half ? j + half : j - half] * sin[j];
  std::copy(tmp, tmp + d, x);
}

// transformers' gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
inline float gelu_tanh(float x) {
  return 0.5f * x * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

}  // namespace

DecoderLayer::DecoderLayer(DecoderLayerShape shape, DecoderLayerWeights weights)
    : s_(shape), w_(std::move(weights)) {
  const int H = s_.heads, KH = s_.kv_heads, d = s_.head_dim, hid = s_.hidden;
  if (hid < 1 || H < 1 || KH < 1 || d < 2 || d % 2 || d > kMaxHeadDim || s_.inter < 1 || H % KH)
    throw std::invalid_argument("decoder layer: heads must be a multiple of kv_heads, head_dim even and at most " +
                                std::to_string(kMaxHeadDim) + ", sizes positive");
  if (int(w_.ln1.size()) != hid || int(w_.ln2.size()) != hid)
    throw std::invalid_argument("decoder layer: norm weights must have hidden_size values");
  if (w_.q_norm.size() != w_.k_norm.size() || (!w_.q_norm.empty() && int(w_.q_norm.size()) != d))
    throw std::invalid_argument("decoder layer: q/k norms must both be absent or have head_dim values");
  if (w_.post_attn.size() != w_.post_mlp.size() || (!w_.post_attn.empty() && int(w_.post_attn.size()) != hid))
    throw std::invalid_argument("decoder layer: post-attention / post-MLP norms must both be absent or have "
                                "hidden_size values");
  if (s_.window < 0) throw std::invalid_argument("decoder layer: the sliding window must be >= 0 (0: none)");
  if ((w_.k == nullptr) != (w_.v == nullptr))
    throw std::invalid_argument("decoder layer: k_proj and v_proj must both be given, or neither (a fused qkv_proj)");
  if (w_.k == nullptr) {
    expect_plan(w_.q, "qkv_proj", (H + 2 * KH) * d, hid);
  } else {
    expect_plan(w_.q, "q_proj", H * d, hid);
    expect_plan(w_.k, "k_proj", KH * d, hid);
    expect_plan(w_.v, "v_proj", KH * d, hid);
  }
  expect_plan(w_.o, "o_proj", hid, H * d);
  if (w_.gate == nullptr) {
    expect_plan(w_.up, "gate_up_proj", 2 * s_.inter, hid);
  } else {
    expect_plan(w_.gate, "gate_proj", s_.inter, hid);
    expect_plan(w_.up, "up_proj", s_.inter, hid);
  }
  expect_plan(w_.down, "down_proj", hid, s_.inter);
  if (!(s_.attn_softcap >= 0.f)) throw std::invalid_argument("decoder layer: attention soft-capping must be >= 0");
  x_.resize(std::max(hid, s_.inter));
  qkv_.resize(size_t(H + 2 * KH) * d);
  attn_.resize(size_t(H) * d);
  gu_.resize(2 * size_t(s_.inter));
  out_.resize(hid);
  // q / k / v (gate / up) with one input side (tied input scales) run as one group: one input
  // transform, one parallel region for their GEMVs.
  if (w_.k != nullptr && w_.k->shares_input_side(*w_.q) && w_.v->shares_input_side(*w_.q)) {
    qkv_group_ = {w_.q, w_.k, w_.v};
    qkv_out_ = {qkv_.data(), qkv_.data() + size_t(H) * d, qkv_.data() + size_t(H + KH) * d};
  }
  if (w_.gate != nullptr && w_.up->shares_input_side(*w_.gate)) {
    gate_up_group_ = {w_.gate, w_.up};
    gate_up_out_ = {gu_.data(), gu_.data() + s_.inter};
  }
}

void DecoderLayer::attend(int pos, const float* k_cache, const float* v_cache, int capacity,
                          int threads, bool force_scalar) const {
  const int H = s_.heads, d = s_.head_dim, group = H / s_.kv_heads;
  const int first = s_.window > 0 ? std::max(0, pos + 1 - s_.window) : 0, len = pos + 1 - first;
  if (scores_.size() < size_t(H) * len) scores_.resize(size_t(H) * len);
  const AttendHead attend_head = select_attend_head(force_scalar);
  const int parts = std::max(1, std::min(threads, H));
  ThreadPool::instance().run(parts, [&](int part) {
    int lo, hi;
    split_range(H, parts, part, 1, &lo, &hi);
    for (int h = lo; h < hi; ++h) {
      const size_t kv = (size_t(h / group) * capacity + first) * d;
      attend_head(qkv_.data() + size_t(h) * d, k_cache + kv, v_cache + kv, len, d, s_.scaling, s_.attn_softcap,
                  scores_.data() + size_t(h) * len, attn_.data() + size_t(h) * d);
    }
  });
}

void DecoderLayer::step(float* h, int pos, float* k_cache, float* v_cache, int capacity,
                        const float* cos, const float* sin, int threads, bool force_scalar) const {
  if (pos < 0 || pos >= capacity)
    throw std::invalid_argument("decoder layer: position " + std::to_string(pos) +
                                " is outside the cache (" + std::to_string(capacity) + " positions)");
  const int H = s_.heads, KH = s_.kv_heads, d = s_.head_dim, hid = s_.hidden, I = s_.inter;
  float* x = x_.data();
  float* q = qkv_.data();
  float* k = q + size_t(H) * d;
  float* v = k + size_t(KH) * d;
  float tmp[kMaxHeadDim];

  rms_norm(h, w_.ln1.data(), hid, s_.eps1, x);
  if (!qkv_group_.empty()) {
    QuipLinearPlan::forward_group(qkv_group_, x, 1, qkv_out_, threads, force_scalar);
  } else {
    w_.q->forward(x, 1, q, threads, force_scalar);  // q, k, v contiguous: a fused qkv_proj fills all three
    if (w_.k != nullptr) {
      w_.k->forward(x, 1, k, threads, force_scalar);
      w_.v->forward(x, 1, v, threads, force_scalar);
    }
  }
  for (int i = 0; i < H + KH; ++i) {
    float* r = q + size_t(i) * d;   // q's heads, then k's
    if (!w_.q_norm.empty()) {
      rms_norm(r, (i < H ? w_.q_norm : w_.k_norm).data(), d, s_.qk_eps, tmp);
      std::copy(tmp, tmp + d, r);
    }
    rotate(r, cos, sin, d, tmp);
  }
  for (int g = 0; g < KH; ++g) {
    std::copy(k + size_t(g) * d, k + size_t(g + 1) * d, k_cache + (size_t(g) * capacity + pos) * d);
    std::copy(v + size_t(g) * d, v + size_t(g + 1) * d, v_cache + (size_t(g) * capacity + pos) * d);
  }
  attend(pos, k_cache, v_cache, capacity, threads, force_scalar);
  w_.o->forward(attn_.data(), 1, out_.data(), threads, force_scalar);
  add_residual(h, w_.post_attn);

  rms_norm(h, w_.ln2.data(), hid, s_.eps2, x);
  float* g = gu_.data();
  float* u = g + I;
  if (!gate_up_group_.empty()) {
    QuipLinearPlan::forward_group(gate_up_group_, x, 1, gate_up_out_, threads, force_scalar);
  } else if (w_.gate != nullptr) {
    w_.gate->forward(x, 1, g, threads, force_scalar);
    w_.up->forward(x, 1, u, threads, force_scalar);
  } else {
    w_.up->forward(x, 1, g, threads, force_scalar);   // gate_up_proj: gate rows, then up rows
  }
  if (s_.act == MlpActivation::kGeluTanh) {
    for (int j = 0; j < I; ++j) x[j] = gelu_tanh(g[j]) * u[j];
  } else {
    for (int j = 0; j < I; ++j) x[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
  }
  w_.down->forward(x, 1, out_.data(), threads, force_scalar);
  add_residual(h, w_.post_mlp);
}

void DecoderLayer::add_residual(float* h, const std::vector<float>& post_norm) const {
  const int hid = s_.hidden;
  if (!post_norm.empty()) {
    rms_norm(out_.data(), post_norm.data(), hid, s_.post_eps, x_.data());
    for (int j = 0; j < hid; ++j) h[j] += x_[j];
  } else {
    for (int j = 0; j < hid; ++j) h[j] += out_[j];
  }
}

}  // namespace quipc
