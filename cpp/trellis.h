// Viterbi encoding on the tail-biting bitshift trellis of the "trellis" code format
// (runtime/quipc_runtime/formats/trellis.py defines the format; quipc/passes/encoders/
// trellis_viterbi.py the numpy reference this kernel reproduces state for state).
#pragma once
#include <cstdint>

namespace quipc {

// Encodes `batch` sequences of length T (x: batch x T floats, row-major) on the trellis with
// 2^L states and k bits per step (s_{t+1} = (s_t << k | b) mod 2^L), table: the 2^L code
// values. Each path closes into a circle (the top L - k bits of s_0 equal the low L - k bits
// of s_{T-1}); states (batch x T) receives every position's state. Runs on `threads` parts
// of the thread pool; force_scalar picks the portable step functions over the AVX2 ones.
// k in 2..4, 2k <= L <= 16.
void trellis_encode(const float* x, int batch, int T, const float* table, int L, int k,
                    int32_t* states, int threads, bool force_scalar = false);

// One trellis step, in two parts (scalar reference and AVX2 side by side):
//   min_predecessors: best[j] = min_top cost[top * G + j], back[j] = the first top reaching it
//   add_branch:       next[j * K + b] = best[j] + (xt - table[j * K + b])^2
// with K = 2^k predecessors per state and G = 2^L / K groups. The AVX2 versions need G a
// multiple of 32 and do the same float operations in the same order.
struct TrellisStep {
  void (*min_predecessors)(const float* cost, int G, int K, float* best, uint8_t* back);
  void (*add_branch)(const float* best, const float* table, float xt, int G, int K, float* next);
};
const TrellisStep& trellis_step_scalar();
const TrellisStep& trellis_step_avx2();  // only valid when cpu_has_avx2_fma()

}  // namespace quipc
