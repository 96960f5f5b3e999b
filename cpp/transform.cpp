#include "transform.h"

#include <algorithm>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>

#include "thread_pool.h"

namespace quipc {

KronTransform::KronTransform(int n, std::vector<Factor> factors) : n_(n), factors_(std::move(factors)) {
  long long prod = 1;
  double gain = 1.0;
  for (auto& f : factors_) {
    if (f.order < 1) throw std::invalid_argument("transform factor order must be positive");
    prod *= f.order;
    if (f.fwht) {
      if (f.order & (f.order - 1))
        throw std::invalid_argument("a Walsh-Hadamard factor must have power-of-two order, got " +
                                    std::to_string(f.order));
      gain /= std::sqrt(double(f.order));
    } else {
      if (f.mat.size() != size_t(f.order) * f.order)
        throw std::invalid_argument("transform factor matrix has the wrong size");
      f.mat_t.resize(f.mat.size());
      for (int i = 0; i < f.order; ++i)
        for (int j = 0; j < f.order; ++j) f.mat_t[size_t(j) * f.order + i] = f.mat[size_t(i) * f.order + j];
    }
  }
  if (!factors_.empty() && prod != n)
    throw std::invalid_argument("transform factor orders multiply to " + std::to_string(prod) +
                                ", expected " + std::to_string(n));
  gain_ = float(gain);
}

double KronTransform::madds() const {
  double per = 0.0;
  for (const Factor& f : factors_) per += f.fwht ? std::log2(double(f.order)) : double(f.order);
  return per * n_;
}

bool KronTransform::operator==(const KronTransform& o) const {
  if (n_ != o.n_ || factors_.size() != o.factors_.size()) return false;
  for (size_t a = 0; a < factors_.size(); ++a) {
    const Factor &f = factors_[a], &g = o.factors_[a];
    if (f.order != g.order || f.fwht != g.fwht || f.mat != g.mat) return false;
  }
  return true;
}

namespace {

// C (M x N) = A (M x K) * B (K x N) with the rows of C split over the pool when large.
void gemm_rows(const KernelTable& k, int M, int N, int K, const float* A, const float* B, float* C,
               int threads) {
  const double work = double(M) * N * K;
  const int nt = std::max(1, std::min({threads, M / 4, int(work / (1 << 17))}));
  ThreadPool::instance().run(nt, [&](int tid) {
    int r0, r1;
    split_range(M, nt, tid, 2, &r0, &r1);
    if (r0 < r1) k.gemm_f32(r1 - r0, N, K, A + size_t(r0) * K, K, B, N, C + size_t(r0) * N, N);
  });
}

}  // namespace

void KronTransform::apply(const KernelTable& k, float* x, float* scratch, int threads) const {
  float* cur = x;
  float* other = scratch;
  int pre = 1;
  for (size_t a = 0; a < factors_.size(); ++a) {
    const Factor& f = factors_[a];
    const int post = n_ / (pre * f.order);
    if (f.fwht) {
      k.fwht(cur, pre, f.order, post);
    } else if (post == 1) {  // last axis: rows of x times F^T
      gemm_rows(k, pre, f.order, f.order, cur, f.mat_t.data(), other, threads);
      std::swap(cur, other);
    } else {  // inner axis: F times each (order x post) block
      const size_t block = size_t(f.order) * post;
      for (int p = 0; p < pre; ++p)
        gemm_rows(k, f.order, post, f.order, f.mat.data(), cur + p * block, other + p * block,
                  threads);
      std::swap(cur, other);
    }
    pre *= f.order;
  }
  if (cur != x) std::memcpy(x, cur, sizeof(float) * size_t(n_));
}

}  // namespace quipc
