// Kronecker-factored orthogonal transforms on activation rows: K x with
// K = F_1 (x) ... (x) F_k, x viewed row-major as (f_1, ..., f_k). Power-of-two Sylvester
// Hadamard factors run as a fast Walsh-Hadamard transform (O(n log n), unnormalized: the
// 1/sqrt(f) factors are collected in gain() and folded into the caller's scale vectors);
// the other factors (small Hadamard order m, random orthogonal) as small dense products.
#pragma once
#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace quipc {

struct Factor {
  int order = 1;
  bool fwht = false;         // apply as Walsh-Hadamard butterflies instead of `mat`
  std::vector<float> mat;    // order x order, row-major (unused for fwht)
  std::vector<float> mat_t;  // its transpose
};

class KronTransform {
 public:
  KronTransform() = default;
  KronTransform(int n, std::vector<Factor> factors);
  int n() const { return n_; }
  bool identity() const { return factors_.empty(); }
  float gain() const { return gain_; }
  // Multiply-adds (or butterfly adds) of one apply: n times each dense factor's order and each
  // Walsh-Hadamard factor's log2(order).
  double madds() const;
  // x <- K x / gain() for one row of n floats; scratch holds n floats. Large dense factors
  // split their rows over up to `threads` pool threads (call with 1 inside a pool region).
  void apply(const KernelTable& k, float* x, float* scratch, int threads = 1) const;
  // The same map: equal sizes and factors (orders, kinds, equal matrix entries).
  bool operator==(const KronTransform& o) const;

 private:
  int n_ = 0;
  float gain_ = 1.f;
  std::vector<Factor> factors_;
};

}  // namespace quipc
