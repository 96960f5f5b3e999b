// Plans run together on one input: a QuipLinearGroup node's parts, a decoder block's q / k / v
// and gate / up where their input sides are tied (quip_linear.h: forward_group, matmul_group).
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "plan_scratch.h"
#include "quip_linear.h"
#include "thread_pool.h"

namespace quipc {

bool QuipLinearPlan::shares_input_side(const QuipLinearPlan& other) const {
  return d_.n == other.d_.n && npad_ == other.npad_ && in_vec_ == other.in_vec_ && t_in_ == other.t_in_;
}

bool QuipLinearPlan::matmul_group(const KernelTable& k, const std::vector<const QuipLinearPlan*>& plans,
                                  const float* z, const float* zsum, int batch, const std::vector<float*>& ts,
                                  int threads) {
  if (plans.empty() || plans.size() != ts.size()) return false;
  const QuipLinearPlan& head = *plans[0];
  double work = 0.0;
  int units = 0, extra_floats = 0;
  for (const QuipLinearPlan* p : plans) {
    if (p->n() != head.n() || !p->matmul_is_gemv(batch) || p->matmul_path(batch) != head.matmul_path(batch) ||
        p->gemv_int8() != head.gemv_int8())
      return false;
    work += double(batch) * p->m() * p->n();
    units += (p->m() + p->gemv_row_align() - 1) / p->gemv_row_align();
    extra_floats += p->gemv_extra_floats(batch);
  }
  const GemvInput in = head.gemv_input(k, z, zsum, batch);  // every part reads the same
  float* extra = extra_floats ? plan_scratch(6, size_t(extra_floats)) : nullptr;
  std::vector<float*> extras(plans.size(), nullptr);
  for (size_t p = 0, at = 0; p < plans.size() && extra; at += size_t(plans[p]->gemv_extra_floats(batch)), ++p)
    extras[p] = extra + at;
  // Each thread takes its share of every part's rows: one region, as balanced as the parts.
  const int nt = plan_threads(threads, units, work);
  ThreadPool::instance().run(nt, [&](int tid) {
    for (size_t p = 0; p < plans.size(); ++p) {
      int i0, i1;
      split_range(plans[p]->m(), nt, tid, plans[p]->gemv_row_align(), &i0, &i1);
      if (i0 < i1) plans[p]->gemv_rows(k, in, i0, i1, ts[p], extras[p]);
    }
  });
  return true;
}

namespace {

// The parts' output sides on up to `threads` threads, one part per task, each task's parts
// chosen greedily (largest first onto the least loaded thread); on the calling thread alone,
// without that bookkeeping, where the parts are not worth a second thread (SmolLM2's sizes).
void transform_outs(const KernelTable& k, const std::vector<const QuipLinearPlan*>& plans,
                    const std::vector<float*>& ts, int batch, const std::vector<float*>& ys, int threads) {
  double total = 0.0;
  for (const QuipLinearPlan* p : plans) total += double(batch) * p->transform_out_madds();
  const int nt = plan_threads(threads, int(plans.size()), total);
  if (nt == 1) {
    for (size_t p = 0; p < plans.size(); ++p) plans[p]->transform_out(k, ts[p], batch, ys[p], threads);
    return;
  }
  std::vector<int> order(plans.size());
  for (size_t p = 0; p < plans.size(); ++p) order[p] = int(p);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return plans[size_t(a)]->transform_out_madds() > plans[size_t(b)]->transform_out_madds();
  });
  std::vector<int> owner(plans.size());
  std::vector<double> load(size_t(nt), 0.0);
  for (int p : order) {
    const int t = int(std::min_element(load.begin(), load.end()) - load.begin());
    owner[size_t(p)] = t;
    load[size_t(t)] += plans[size_t(p)]->transform_out_madds();
  }
  ThreadPool::instance().run(nt, [&](int tid) {
    for (size_t p = 0; p < plans.size(); ++p)
      if (owner[p] == tid) plans[p]->transform_out(k, ts[p], batch, ys[p], 1);
  });
}

}  // namespace

void QuipLinearPlan::forward_group(const std::vector<const QuipLinearPlan*>& plans, const float* x, int batch,
                                   const std::vector<float*>& ys, int threads, bool force_scalar) {
  if (plans.empty() || plans.size() != ys.size())
    throw std::invalid_argument("forward_group: one output per plan, at least one plan");
  if (batch <= 0) return;
  const KernelTable& k = select_kernels(force_scalar);
  const QuipLinearPlan& head = *plans[0];
  size_t total = 0;
  bool sums = false;
  for (const QuipLinearPlan* p : plans) {
    total += size_t(batch) * p->m();
    sums = sums || p->needs_zsum(batch);
  }
  float* z = plan_scratch(0, size_t(batch) * head.npad_);
  float* zsum = sums ? plan_scratch(1, size_t(batch)) : nullptr;
  float* t = plan_scratch(2, total);
  std::vector<float*> ts;
  for (const QuipLinearPlan* p : plans) {
    ts.push_back(t);
    t += size_t(batch) * p->m();
  }
  head.transform_in(k, x, batch, z, zsum, threads);
  if (plans.size() > 1 && matmul_group(k, plans, z, zsum, batch, ts, threads)) {
    transform_outs(k, plans, ts, batch, ys, threads);
    return;
  }
  for (size_t p = 0; p < plans.size(); ++p) {
    plans[p]->matmul(k, z, zsum, batch, ts[p], threads);
    plans[p]->transform_out(k, ts[p], batch, ys[p], threads);
  }
}

}  // namespace quipc
