#include "quip_node.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "../e8p.h"

namespace quipc {
namespace {

using ort::Tensor;

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  float f;
  if (exp == 0) {
    f = std::ldexp(float(man), -24);  // zero or subnormal
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    const uint32_t bits = ((exp + 112) << 23) | (man << 13);
    std::memcpy(&f, &bits, sizeof f);
  }
  return sign ? -f : f;
}

std::vector<float> halves_to_floats(const Tensor& t) {
  std::vector<float> out(size_t(t.count()));
  const uint16_t* p = static_cast<const uint16_t*>(t.data);
  for (size_t i = 0; i < out.size(); ++i) out[i] = half_to_float(p[i]);
  return out;
}

// Walks a node's weight inputs in order, each told apart by element type and rank.
class Reader {
 public:
  Reader(const std::vector<Tensor>& w, const std::string& node) : w_(w), node_(node) {}
  bool next_is(int type, int rank) const {
    return pos_ < w_.size() && w_[pos_].type == type && w_[pos_].rank() == rank;
  }
  const Tensor& take(const char* what, int type, int rank) {
    if (!next_is(type, rank)) {
      std::string got = pos_ < w_.size() ? w_[pos_].describe() : std::string("no input");
      throw fail(std::string(what) + ": expected a rank-" + std::to_string(rank) + " " +
                 ort::type_name(type) + " tensor, got " + got);
    }
    return w_[pos_++];
  }
  const Tensor* take_if(int type, int rank) { return next_is(type, rank) ? &w_[pos_++] : nullptr; }
  std::vector<const Tensor*> take_all(int type, int rank) {
    std::vector<const Tensor*> out;
    while (next_is(type, rank)) out.push_back(&w_[pos_++]);
    return out;
  }
  void expect_end() {
    if (pos_ != w_.size()) throw fail("unexpected " + w_[pos_].describe() + " tensor");
  }
  ort::Error fail(const std::string& msg) const {
    return ort::invalid("quipc node '" + node_ + "', input " + std::to_string(pos_ + 1) + ": " + msg);
  }

 private:
  const std::vector<Tensor>& w_;
  const std::string& node_;
  size_t pos_ = 0;
};

// A normalized Sylvester Hadamard matrix (run as a fast Walsh-Hadamard transform)?
bool is_sylvester(const float* mat, int order) {
  if (order < 2 || (order & (order - 1))) return false;
  const float v = 1.f / std::sqrt(float(order));
  for (int i = 0; i < order; ++i)
    for (int j = 0; j < order; ++j) {
      const float want = (__builtin_popcount(unsigned(i & j)) & 1) ? -v : v;
      if (std::fabs(mat[size_t(i) * order + j] - want) > 1e-6f * v) return false;
    }
  return true;
}

// K = F_1 x ... x F_k from (f, f) float inputs; transpose: each factor transposed.
KronTransform make_transform(int n, const std::vector<const Tensor*>& mats, bool transpose) {
  std::vector<Factor> factors;
  for (const Tensor* t : mats) {
    if (t->dim(0) != t->dim(1) || t->dim(0) < 1)
      throw ort::invalid("a transform factor must be a square matrix, got " + t->describe());
    Factor f;
    f.order = int(t->dim(0));
    const float* p = static_cast<const float*>(t->data);
    f.fwht = is_sylvester(p, f.order);
    if (!f.fwht) {
      f.mat.resize(size_t(f.order) * f.order);
      for (int i = 0; i < f.order; ++i)
        for (int j = 0; j < f.order; ++j)
          f.mat[size_t(i) * f.order + j] = transpose ? p[size_t(j) * f.order + i] : p[size_t(i) * f.order + j];
    }
    factors.push_back(std::move(f));
  }
  return KronTransform(n, std::move(factors));
}

// The first factors of `mats` whose orders multiply to n (the input side of a QuipLinear).
size_t input_factor_count(const std::vector<const Tensor*>& mats, int n, bool identity) {
  if (identity) return 0;
  int64_t prod = 1;
  for (size_t k = 0; k < mats.size(); ++k) {
    prod *= mats[k]->dim(0);
    if (prod == n) return k + 1;
    if (prod > n) break;
  }
  throw ort::invalid("the input transform factors do not multiply to in_features = " + std::to_string(n));
}

// One part's own inputs: weights, then [out_sign_bits], [bias]; its factors are read by the caller.
struct PartInputs {
  const Tensor* codes = nullptr;
  const Tensor* scale = nullptr;
  const Tensor* zero = nullptr;
  const Tensor* signs = nullptr;
  std::vector<const Tensor*> out_factors;
  const Tensor* bias = nullptr;
};

void read_weights(Reader& r, CodeFormat fmt, PartInputs& p) {
  p.codes = &r.take("codes", kOrtUint8, 2);
  if (fmt != CodeFormat::kGrid) {   // e8p (m, stages), trellis (m, 1); no zero points
    p.scale = &r.take("scale", kOrtFloat16, 2);
  } else {
    p.scale = &r.take("scale", kOrtFloat16, 1);
    p.zero = &r.take("zero", kOrtFloat16, 1);
  }
}

void read_output_side(Reader& r, PartInputs& p) {
  p.signs = r.take_if(kOrtUint8, 1);
  p.out_factors = r.take_all(kOrtFloat, 2);
  p.bias = r.take_if(kOrtFloat, 1);
}

std::vector<float> sign_vector(const Tensor* bits, int m) {
  std::vector<float> s(size_t(m), 1.f);
  if (bits == nullptr) return s;
  if (bits->dim(0) != (m + 7) / 8)
    throw ort::invalid("out_sign_bits has " + std::to_string(bits->dim(0)) + " bytes, expected " +
                       std::to_string((m + 7) / 8));
  const uint8_t* b = static_cast<const uint8_t*>(bits->data);
  for (int i = 0; i < m; ++i) s[size_t(i)] = (b[i / 8] >> (7 - i % 8)) & 1 ? -1.f : 1.f;
  return s;
}

std::vector<float> float_vector(const Tensor* t, size_t len, const char* what) {
  if (t == nullptr) return {};
  if (size_t(t->count()) != len)
    throw ort::invalid(std::string(what) + " is " + t->describe() + ", expected " + std::to_string(len) +
                       " values");
  if (t->type == kOrtFloat16) return halves_to_floats(*t);
  const float* p = static_cast<const float*>(t->data);
  return std::vector<float>(p, p + len);
}

std::unique_ptr<QuipLinearPlan> make_plan(const NodeSpec& spec, int m_expected, const PartInputs& p,
                                          const std::vector<float>& in_scale,
                                          const std::vector<const Tensor*>& in_factors) {
  const int m = int(p.codes->dim(0)), n = spec.n;
  if (m != m_expected)
    throw ort::invalid("codes have " + std::to_string(m) + " rows, the node's out features say " +
                       std::to_string(m_expected));
  LayerData d;
  d.format = spec.format;
  d.m = m;
  d.n = n;
  d.bits = spec.bits;
  d.codes = static_cast<const uint8_t*>(p.codes->data);
  d.row_bytes = size_t(p.codes->dim(1));
  if (d.row_bytes != size_t((n + 7) / 8) * size_t(spec.bits))
    throw ort::invalid("codes are " + p.codes->describe() + ", expected " + std::to_string((n + 7) / 8 * spec.bits) +
                       " bytes a row for " + std::to_string(spec.bits) + " bits and in_features " + std::to_string(n));
  const size_t stages = spec.format == CodeFormat::kE8P ? size_t(e8p_stages(spec.bits)) : 1;
  d.scale = float_vector(p.scale, size_t(m) * stages, "scale");
  d.zero = float_vector(p.zero, size_t(m), "zero");
  d.in_scale = in_scale.empty() ? std::vector<float>(size_t(n), 1.f) : in_scale;
  d.out_scale = sign_vector(p.signs, m);
  d.bias = float_vector(p.bias, size_t(m), "bias");
  d.e8p_as_grid4 = true;   // 2-bit e8p nodes by the 4-bit grid kernels (LayerData)
  // Every trellis node's GEMV on an 8-bit copy of W' (LayerData; not exact), at every
  // accuracy_level, as TVM's default build (`--tvm-trellis int8`): SmolLM2 w4 on fp32
  // activations, teacher-forced decode perplexity over 6 x 256 tokens 39.26 against 39.11 on
  // the exact code-table GEMV (+0.4 %), decode 13.3 instead of ~23 ms per token (2 threads,
  // Xeon host); on int8 activations 39.38 and 11.2 ms.
  d.trellis_as_int8 = true;
  d.int8_activations = int8_activations_at(spec.accuracy_level);
  KronTransform t_in = make_transform(n, in_factors, false);
  KronTransform t_out = make_transform(m, p.out_factors, true);  // K_out^T: factors transposed
  return std::make_unique<QuipLinearPlan>(std::move(d), std::move(t_in), std::move(t_out));
}

}  // namespace

QuipNode::QuipNode(const NodeSpec& spec, const std::vector<Tensor>& weights) : spec_(spec) {
  Reader r(weights, spec.name);
  try {
    std::vector<PartInputs> parts(spec.out_split.size());
    std::vector<float> in_scale;
    std::vector<const Tensor*> in_factors;
    if (spec.group) {
      in_scale = float_vector(r.take_if(kOrtFloat16, 1), size_t(spec.n), "in_scale");
      in_factors = r.take_all(kOrtFloat, 2);
      for (PartInputs& p : parts) {
        read_weights(r, spec.format, p);
        read_output_side(r, p);
      }
    } else {
      read_weights(r, spec.format, parts[0]);
      in_scale = float_vector(r.take_if(kOrtFloat16, 1), size_t(spec.n), "in_scale");
      read_output_side(r, parts[0]);  // all factors, split below
      std::vector<const Tensor*>& all = parts[0].out_factors;
      const size_t k = input_factor_count(all, spec.n, spec.in_identity);
      in_factors.assign(all.begin(), all.begin() + long(k));
      all.erase(all.begin(), all.begin() + long(k));
    }
    r.expect_end();
    for (size_t i = 0; i < parts.size(); ++i) {
      plans_.push_back(make_plan(spec, spec.out_split[i], parts[i], in_scale, in_factors));
      parts_.push_back(plans_.back().get());
    }
  } catch (const std::invalid_argument& e) {  // from the plans' own checks
    throw ort::invalid("quipc node '" + spec.name + "': " + e.what());
  } catch (const ort::Error& e) {
    if (std::strncmp(e.what(), "quipc node", 10) == 0) throw;
    throw ort::invalid("quipc node '" + spec.name + "': " + e.what());
  }
}

void QuipNode::forward(const float* x, int rows, const std::vector<float*>& ys, int threads) const {
  QuipLinearPlan::forward_group(parts_, x, rows, ys, threads, false);
}

}  // namespace quipc
