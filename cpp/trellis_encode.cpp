// Tail-biting Viterbi for the "trellis" format: two passes per sequence (QTIP): the sequence
// rotated by T/2 encoded freely fixes the bits at the original start, then the sequence is
// encoded with its start and end held to them. The arithmetic is the numpy reference's, in
// float32 and in the same order (d = x - code; cost = best + d * d; first minimum on ties);
// the trellis sources are built with -ffp-contract=off so that no fused multiply-add changes
// a rounding. This file holds the driver and the portable step functions; trellis_encode_avx2.cpp
// the AVX2 ones.
#include <algorithm>
#include <limits>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"
#include "trellis.h"

namespace quipc {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

void min_predecessors(const float* cost, int G, int K, float* best, uint8_t* back) {
  for (int j = 0; j < G; ++j) {
    best[j] = cost[j];
    back[j] = 0;
  }
  for (int top = 1; top < K; ++top) {
    const float* c = cost + size_t(top) * G;
    for (int j = 0; j < G; ++j) {
      if (c[j] < best[j]) {
        best[j] = c[j];
        back[j] = uint8_t(top);
      }
    }
  }
}

void add_branch(const float* best, const float* table, float xt, int G, int K, float* next) {
  for (int j = 0; j < G; ++j) {
    for (int b = 0; b < K; ++b) {
      const float d = xt - table[j * K + b];
      next[j * K + b] = best[j] + d * d;
    }
  }
}

struct Scratch {
  std::vector<float> cost, next, best, rotated;
  std::vector<uint8_t> back;  // T x G: the chosen predecessor's top bits per group
};

// One pass over x[0..T); start < 0: a free path, else s_0 >> k == start and
// (s_{T-1} & (G - 1)) == start.
void viterbi(const TrellisStep& step, const float* x, int T, const float* table, int L, int k,
             long start, Scratch& w, int32_t* out) {
  const int S = 1 << L, K = 1 << k, G = S >> k;
  float* cost = w.cost.data();
  float* next = w.next.data();
  for (int s = 0; s < S; ++s) {
    const float d = x[0] - table[s];
    cost[s] = (start < 0 || (s >> k) == start) ? d * d : kInf;
  }
  for (int t = 1; t < T; ++t) {
    step.min_predecessors(cost, G, K, w.best.data(), w.back.data() + size_t(t) * G);
    step.add_branch(w.best.data(), table, x[t], G, K, next);
    std::swap(cost, next);
  }
  int s = -1;
  float best = kInf;
  for (int c = 0; c < S; ++c) {
    if (start >= 0 && (c & (G - 1)) != start) continue;
    if (s < 0 || cost[c] < best) {
      best = cost[c];
      s = c;
    }
  }
  for (int t = T - 1; t >= 0; --t) {
    out[t] = s;
    if (t) {
      const int j = s >> k;
      s = int(w.back[size_t(t) * G + j]) * G + j;
    }
  }
}

}  // namespace

const TrellisStep& trellis_step_scalar() {
  static const TrellisStep step{min_predecessors, add_branch};
  return step;
}

#ifndef QUIPC_HAVE_AVX2
const TrellisStep& trellis_step_avx2() { return trellis_step_scalar(); }
#endif

void trellis_encode(const float* x, int batch, int T, const float* table, int L, int k,
                    int32_t* states, int threads, bool force_scalar) {
  if (k < 2 || k > 4 || L < 2 * k || L > 16 || T < 2)
    throw std::invalid_argument("trellis_encode: needs 2 <= k <= 4, 2k <= L <= 16 and T >= 2");
  const int S = 1 << L, G = S >> k;
  const TrellisStep& step =
      (force_scalar || G % 32 || !cpu_has_avx2_fma()) ? trellis_step_scalar() : trellis_step_avx2();
  const int parts = std::max(1, std::min(threads, batch));
  ThreadPool::instance().run(parts, [&](int p) {
    int lo, hi;
    split_range(batch, parts, p, 1, &lo, &hi);
    Scratch w;
    w.cost.resize(S);
    w.next.resize(S);
    w.best.resize(G);
    w.back.resize(size_t(T) * G);
    w.rotated.resize(T);
    std::vector<int32_t> path(T);
    for (int b = lo; b < hi; ++b) {
      const float* xb = x + size_t(b) * T;
      const int half = T / 2;  // rotated[i] = x[(i - half) mod T]: x[0] lands at T/2
      for (int i = 0; i < T; ++i) w.rotated[i] = xb[(i - half + T) % T];
      viterbi(step, w.rotated.data(), T, table, L, k, -1, w, path.data());
      viterbi(step, xb, T, table, L, k, long(path[half] >> k), w, states + size_t(b) * T);
    }
  });
}

}  // namespace quipc
