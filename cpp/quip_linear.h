// One QuIP linear layer on the CPU: y = out_scale * K_out^T (W' (K_in (in_scale * x))) + bias,
// computed straight from the artifact's packed codes. W' is stored in a code format, chosen
// at plan creation: "grid" (W' = scale * codes + zero), "e8p" (e8p.h) or "trellis" / "trellis256" (trellis.h).
#pragma once
#include <cstdint>
#include <vector>

#include "code_format.h"
#include "kernels.h"
#include "row_tiles.h"
#include "transform.h"

namespace quipc {

struct LayerData {
  CodeFormat format = CodeFormat::kGrid;
  int m = 0, n = 0, bits = 0;
  const uint8_t* codes = nullptr;  // m x row_bytes, owned by the caller (kept alive there)
  size_t row_bytes = 0;
  std::vector<float> scale, zero;  // grid: (m) each; e8p: scale (m, stages); trellis: (m); zero empty
  std::vector<float> in_scale;     // (n): input signs and diagonal rescaling
  std::vector<float> out_scale;    // (m): output signs
  std::vector<float> bias;         // (m) or empty
  // An e8p layer's GEMV (batch <= kGemvMaxBatch) run by the 4-bit grid kernel, one pass per
  // stage: every E8P coordinate is q/2 - 15/4 and every E8_1bit one q/2 - 2 with q a nibble, so
  // a stage is exactly the grid row (scale/2) q + zero. The plan then also owns the nibble codes
  // (4 bits a weight per stage); their GEMV takes ~0.7x the e8p kernel's time at 2 bits
  // (SmolLM2 shapes, batch 1), while the e8p GEMM stays the faster prefill. At 3 bits only
  // with int8_activations (two fp32 passes take 1.2x the e8p GEMV's time).
  bool e8p_as_grid4 = false;
  // The GEMV of 4-bit codes (a 4-bit grid layer, or the e8p_as_grid4 codes) on activations
  // quantized to int8 per block of 32 (kernels.h: Int8Acts): ~2x the fp32 GEMV's speed, at a
  // relative error of ~1e-3 on the layer's output (onnxruntime's accuracy_level 4).
  bool int8_activations = false;
  // A trellis layer's GEMV (batch <= kGemvMaxBatch) on an 8-bit copy of W' that the plan
  // builds once (trellis_as_int8.h: per row q = round(W' / step), |q| <= 127, read in one pass
  // by the int8-row kernels, int8_rows.h), instead of a code-table gather per weight. Not exact: a weight moves by up to step / 2 = max_j |W'_ij| / 254, an
  // even error where LDLQ shaped the code's own by the Hessian (SmolLM2 w2's trellis head:
  // decode perplexity +0.27 %); the plan holds 1 byte a weight more. The GEMM stays exact.
  bool trellis_as_int8 = false;
  // The GEMVs on int8 activations (int8_activations) read row tiles (row_tiles.h: 16 rows
  // regrouped for the AVX-512 VNNI kernels): kAuto where cpu_has_avx512_vnni(), kOn always (the
  // portable kernels where the CPU lacks VNNI: for tests), kOff never. The plan then holds the
  // tiles in place of the row copies it builds (e8p's 4-bit planes, trellis' int8 rows); a 4-bit
  // grid layer's tiles are a copy of its codes (0.5 byte a weight more).
  enum class RowTiles { kAuto, kOn, kOff };
  RowTiles row_tiles = RowTiles::kAuto;
};

// One 4-bit grid plane of a layer's W' (as_grid4.h): the grid row scale[i] * codes[i, :] + zero[i].
struct Grid4Plane {
  std::vector<uint8_t> codes;      // m rows of n / 2 bytes (packing.pack's 4-bit layout)
  std::vector<float> scale, zero;  // (m) each
};

// The storage behind an Int8Rows view (kernels.h; built by trellis_as_int8.h).
struct Int8RowsData {
  std::vector<int8_t> q;   // (m, blocks * kActBlock)
  std::vector<float> step;  // (m)
  int m = 0, n = 0, blocks = 0;
  Int8Rows view() const { return Int8Rows{q.data(), step.data(), m, n, blocks}; }
};

class QuipLinearPlan {
 public:
  // t_out must hold the TRANSPOSED output factors (K_out^T is applied on the output side).
  QuipLinearPlan(LayerData data, KronTransform t_in, KronTransform t_out);

  int m() const { return d_.m; }
  int n() const { return d_.n; }
  bool gemv_as_grid4() const { return !grid4_.empty(); }  // e8p_as_grid4 taken
  bool gemv_on_int8_rows() const { return !int8_rows_.step.empty(); }  // trellis_as_int8 taken
  bool gemv_on_row_tiles() const { return !tiles_.empty(); }  // LayerData::row_tiles taken
  int padded_n() const { return npad_; }
  double transform_out_madds() const { return t_out_.madds() + m(); }  // a row's output side
  // LayerData::int8_activations taken for this layer's GEMV (its codes are 4-bit, or int8 rows)
  bool gemv_int8() const;
  // The kernel matmul runs at a batch: the int8 rows, the e8p or trellis kernels, or the grid
  // kernels (the layer's codes, or its e8p stages as 4-bit grid codes) as a GEMM, a GEMV on int8
  // activations or a GEMV on fp32 ones.
  enum class MatmulPath { kInt8Rows, kE8P, kTrellis, kGridGemm, kGridGemvInt8, kGridGemv };
  MatmulPath matmul_path(int batch) const;
  // Whether matmul reads zsum at this batch: the grid kernels' zero-point term on fp32
  // activations (the int8 GEMV sums its quantized activations; e8p and trellis have no zero
  // points).
  bool needs_zsum(int batch) const {
    const MatmulPath p = matmul_path(batch);
    return p == MatmulPath::kGridGemm || p == MatmulPath::kGridGemv;
  }

  // The fused layer: x (B x n) -> y (B x m), row-major.
  void forward(const float* x, int batch, float* y, int threads, bool force_scalar) const;
  // The three stages, exposed for tests and benchmarks.
  // z (B x padded_n, zero padded) = K_in (in_scale * x); zsum[b] = sum_j z[b, j] unless zsum
  // is null.
  void transform_in(const KernelTable& k, const float* x, int batch, float* z, float* zsum,
                    int threads) const;
  // t (B x m) = W' z.
  void matmul(const KernelTable& k, const float* z, const float* zsum, int batch, float* t,
              int threads) const;
  // y = out_scale * K_out^T t + bias; t is used as scratch.
  void transform_out(const KernelTable& k, float* t, int batch, float* y, int threads) const;
  // The matmuls of plans that read one z (a QuipLinearGroup's parts: same n and activation
  // path), ts[p] (B x plans[p]->m()) = W'_p z, where each is a GEMV at this batch: what every
  // row reads (int8 activations, their block order, e8p's group sums) prepared once and all
  // parts' rows in one parallel region. Returns false, having done nothing, where a plan's
  // matmul is not a GEMV at this batch or the plans' paths differ.
  static bool matmul_group(const KernelTable& k, const std::vector<const QuipLinearPlan*>& plans,
                           const float* z, const float* zsum, int batch, const std::vector<float*>& ts,
                           int threads);
  // Whether this plan's input side (in_scale with its gains, K_in) is other's: plans that share
  // it can run as one group (forward_group). Exact comparison, O(n): at construction, not per call.
  bool shares_input_side(const QuipLinearPlan& other) const;
  // The fused layers of plans that share their input side (a QuipLinearGroup's parts; a block's
  // q / k / v or gate / up with tied input scales): x (B x n) -> ys[p] (B x plans[p]->m()), as
  // each plan's forward would give, with the input side computed once, the parts' GEMVs in one
  // parallel region (matmul_group) and, at GEMV batches, the parts' output sides spread over the
  // threads. Throws std::invalid_argument where plans is empty or ys does not match it; the
  // shared input side is the caller's to check (shares_input_side).
  static void forward_group(const std::vector<const QuipLinearPlan*>& plans, const float* x, int batch,
                            const std::vector<float*>& ys, int threads, bool force_scalar);

 private:
  // A GEMV in two steps: its input, prepared by the caller's thread (scratch slots 4 and 5),
  // then rows [i0, i1) of t on any thread; extra: batch x m floats for a second e8p stage.
  struct GemvInput {
    MatmulPath path;
    int batch;
    const float* z;     // B x padded_n
    const float* zsum;  // the grid GEMV's zero-point term on fp32 activations
    Int8Acts acts;      // int8 activations (acts.q null: none)
    const float* qsum;  // their row sums (grid codes' zero points)
    const float* zp;    // int8 rows on fp32 activations: z in block order, len apart
    int len;
    const float* gsum;  // the e8p GEMV's group sums
  };
  bool matmul_is_gemv(int batch) const;
  GemvInput gemv_input(const KernelTable& k, const float* z, const float* zsum, int batch) const;
  int gemv_extra_floats(int batch) const;
  int gemv_row_align() const { return tiles_.empty() ? 8 : kTileRows; }  // rows a GEMV share starts at
  void gemv_rows(const KernelTable& k, const GemvInput& in, int i0, int i1, float* t, float* extra) const;
  void matmul_gemm(const KernelTable& k, MatmulPath path, const float* z, const float* zsum, int batch,
                   float* t, int threads) const;

  LayerData d_;
  // LayerData::e8p_as_grid4: the GEMV's 4-bit grid planes, one per e8p stage (as_grid4.h);
  // LayerData::trellis_as_int8: its int8 rows (trellis_as_int8.h); empty: the format's kernels
  std::vector<Grid4Plane> grid4_;
  Int8RowsData int8_rows_;
  // LayerData::row_tiles: the int8-activation GEMV's codes as row tiles, one per grid plane
  // (the layer's 4-bit codes, or its e8p stages: grid4_ then keeps their scales only) or its int8
  // rows (int8_rows_ then keeps its steps only)
  std::vector<RowTilesData> tiles_;
  KronTransform t_in_, t_out_;
  int npad_;
  std::vector<float> in_vec_, out_vec_;  // in_scale / out_scale with the FWHT gains folded in
};

constexpr int kGemvMaxBatch = 4;  // up to this batch the GEMV kernel beats the tiled GEMM

}  // namespace quipc
