#include <algorithm>
#include <cmath>

#include "attention.h"
#include "kernels.h"

namespace quipc {

void attend_head_scalar(const float* q, const float* K, const float* V, int len, int d, float scale,
                        float softcap, float* scores, float* out) {
  float mx = -INFINITY;
  for (int t = 0; t < len; ++t) {
    const float* kt = K + size_t(t) * d;
    float acc = 0.f;
    for (int j = 0; j < d; ++j) acc += q[j] * kt[j];
    scores[t] = softcap > 0.f ? soft_cap(acc * scale, softcap) : acc * scale;
    mx = std::max(mx, scores[t]);
  }
  float sum = 0.f;
  for (int t = 0; t < len; ++t) sum += (scores[t] = std::exp(scores[t] - mx));
  std::fill(out, out + d, 0.f);
  for (int t = 0; t < len; ++t) {
    const float p = scores[t] / sum;
    const float* vt = V + size_t(t) * d;
    for (int j = 0; j < d; ++j) out[j] += p * vt[j];
  }
}

AttendHead select_attend_head(bool force_scalar) {
#ifdef QUIPC_HAVE_AVX2
  if (!force_scalar && cpu_has_avx2_fma()) return attend_head_avx2;
#endif
  (void)force_scalar;
  return attend_head_scalar;
}

}  // namespace quipc
