// One decode query's attention over a head's cached keys and values (decoder_layer.h):
// out (d) = softmax(scale * K q) V over positions [0, len), K and V rows `d` floats apart; with
// softcap > 0 each score s becomes softcap * tanh(s / softcap) first (Gemma2's soft-capping).
// A portable reference and an AVX2+FMA twin (dot products by 8 lanes, a polynomial exp),
// chosen at run time like the GEMV kernels; tests hold one against the other.
#pragma once
#include <cmath>

namespace quipc {

// scores: len floats of scratch.
void attend_head_scalar(const float* q, const float* K, const float* V, int len, int d, float scale,
                        float softcap, float* scores, float* out);
void attend_head_avx2(const float* q, const float* K, const float* V, int len, int d, float scale,
                      float softcap, float* scores, float* out);  // only valid when cpu_has_avx2_fma()

using AttendHead = void (*)(const float*, const float*, const float*, int, int, float, float, float*, float*);

// s -> softcap * tanh(s / softcap), the one definition both kernels use
inline float soft_cap(float s, float softcap) { return softcap * std::tanh(s / softcap); }
AttendHead select_attend_head(bool force_scalar);

}  // namespace quipc
