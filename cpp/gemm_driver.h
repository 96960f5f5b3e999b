// Blocked dequantize + GEMM, shared by the scalar and AVX2 builds (each TU passes its own
// micro-kernel). Loop order: K panels outermost so the activation slice (nbatch x KC)
// stays in L2; per 16 output features the codes are dequantized once into an fp32
// panel (KC x 16, ~16 KB, L1-resident) that every batch micro-tile then reuses.
#pragma once
#include "kernels.h"
#include "unpack.h"

namespace quipc {
namespace {

// panel[k*16 + r] = code[p0 + r][k0 + k]; rows past `rows` are zero.
inline void pack_code_panel(const Codes& c, int p0, int rows, int k0, int klen, float* panel) {
  float line[kGemmKC];
  for (int r = 0; r < kGemmNR; ++r) {
    if (r < rows) {
      unpack_floats(c.data + size_t(p0 + r) * c.row_bytes, c.bits, k0, klen, line);
      for (int k = 0; k < klen; ++k) panel[k * kGemmNR + r] = line[k];
    } else {
      for (int k = 0; k < klen; ++k) panel[k * kGemmNR + r] = 0.f;
    }
  }
}

// apack[(b / MR) * klen * MR + k * MR + b % MR] = z[b][k0 + k]: each micro-tile's
// activations become one contiguous stream (rows of z are n floats apart, often a
// multiple of 4 KiB, which would alias in L1). Missing rows of the last tile are zero.
inline void pack_activations(const float* z, int ldz, int nbatch, int k0, int klen, float* apack) {
  for (int b0 = 0; b0 < nbatch; b0 += kGemmMR) {
    float* dst = apack + size_t(b0) * klen;
    for (int r = 0; r < kGemmMR; ++r) {
      if (b0 + r < nbatch) {
        const float* src = z + size_t(b0 + r) * ldz + k0;
        for (int k = 0; k < klen; ++k) dst[k * kGemmMR + r] = src[k];
      } else {
        for (int k = 0; k < klen; ++k) dst[k * kGemmMR + r] = 0.f;
      }
    }
  }
}

// Ukernel(rows, K, apack, panel, C, ldc, accumulate, cols): C[rows x cols] (+)= A * panel.
// pack(p0, rows, k0, klen, panel) fills the weight panel of rows [p0, p0 + rows) (rows past
// `rows` zero) for input features [k0, k0 + klen). t[b][i0:i1] = W z_b (no epilogue).
// work: kGemmWork floats for the code panel, then qgemm_work_floats(nbatch) in total.
template <class Ukernel, class PackPanel>
void gemm_panels(int n, int i0, int i1, const float* z, int ldz, int nbatch, float* t, int ldt,
                 float* work, const PackPanel& pack) {
  float* panel = work;
  float* apack = work + kGemmWork;
  for (int k0 = 0; k0 < n; k0 += kGemmKC) {
    const int klen = n - k0 < kGemmKC ? n - k0 : kGemmKC;
    pack_activations(z, ldz, nbatch, k0, klen, apack);
    for (int p0 = i0; p0 < i1; p0 += kGemmNR) {
      const int cols = i1 - p0 < kGemmNR ? i1 - p0 : kGemmNR;
      pack(p0, cols, k0, klen, panel);
      for (int b0 = 0; b0 < nbatch; b0 += kGemmMR) {
        const int rows = nbatch - b0 < kGemmMR ? nbatch - b0 : kGemmMR;
        Ukernel::run(rows, klen, apack + size_t(b0) * klen, panel, t + size_t(b0) * ldt + p0, ldt,
                     k0 > 0, cols);
      }
    }
  }
}

// The grid format: panels of integer codes, then t = scale * (codes . z) + zero * sum(z).
template <class Ukernel>
void qgemm_driver(const Codes& c, const RowAffine& aff, int i0, int i1, const float* z, int ldz,
                  const float* zsum, int nbatch, float* t, int ldt, float* work) {
  gemm_panels<Ukernel>(c.n, i0, i1, z, ldz, nbatch, t, ldt, work,
                       [&c](int p0, int rows, int k0, int klen, float* panel) {
                         pack_code_panel(c, p0, rows, k0, klen, panel);
                       });
  for (int b = 0; b < nbatch; ++b) {
    float* tr = t + size_t(b) * ldt;
    const float zs = zsum[b];
    for (int i = i0; i < i1; ++i) tr[i] = aff.scale[i] * tr[i] + aff.zero[i] * zs;
  }
}

// In-place unnormalized FWHT along the middle axis of (pre, f, post), f a power of two.
// The butterfly span h*post is contiguous, so the inner loop vectorizes once h*post >= 8.
inline void fwht_generic(float* x, int pre, int f, int post) {
  const int len = f * post;
  for (int p = 0; p < pre; ++p) {
    float* v = x + size_t(p) * len;
    for (int h = post; h < len; h *= 2) {
      for (int base = 0; base < len; base += 2 * h) {
        float* a = v + base;
        float* b = v + base + h;
        for (int k = 0; k < h; ++k) {
          const float s = a[k], d = b[k];
          a[k] = s + d;
          b[k] = s - d;
        }
      }
    }
  }
}

}  // namespace
}  // namespace quipc
