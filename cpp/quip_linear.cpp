#include "quip_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>

#include "as_grid4.h"
#include "e8p.h"
#include "trellis.h"
#include "trellis_as_int8.h"
#include "plan_scratch.h"
#include "thread_pool.h"

namespace quipc {
namespace {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, FreeDeleter>;

// 64-byte aligned float buffer (the GEMM panel is read with aligned loads).
Buffer alloc_floats(size_t count) {
  const size_t bytes = ((count * sizeof(float) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (p == nullptr) throw std::bad_alloc();
  return Buffer(static_cast<float*>(p));
}

}  // namespace

float* plan_scratch(int slot, size_t count) {
  struct Slot {
    Buffer buf;
    size_t size = 0;
  };
  thread_local Slot slots[7];
  Slot& s = slots[slot];
  if (s.size < count) {
    s.buf = alloc_floats(count);
    s.size = count;
  }
  return s.buf.get();
}

int plan_threads(int threads, int work_items, double total_work) {
  constexpr double kMinWork = 65536.0;
  const int by_work = int(std::min(total_work / kMinWork, 1e6));
  return std::max(1, std::min({threads, work_items, by_work}));
}

namespace {

// Rows 0..m of the quantized matmul split over the pool (`align` rows at a time): fn(i0, i1)
// on each thread's non-empty share.
template <class RowsFn>
void over_rows(int m, int n, int batch, int align, int threads, RowsFn&& fn) {
  const int nt = plan_threads(threads, (m + align - 1) / align, double(batch) * m * n);
  ThreadPool::instance().run(nt, [&](int tid) {
    int i0, i1;
    split_range(m, nt, tid, align, &i0, &i1);
    if (i0 < i1) fn(i0, i1);
  });
}

// The batch's rows of z (ldz apart, n values each) as int8 blocks in scratch slot 5, and in
// *qsum (unless qsum is null) the row sums of the quantized activations. The zero-point term
// takes those, not the sums of z: the codes' mean (7.5) times the rounding errors' sum then cancels as it does in
// exact arithmetic, and only the centred codes meet the rounding error (with the sums of z,
// SmolLM2 w2's decode perplexity rose 3 %). block_sums: the acts' per-block sums of q too (the
// row tiles' int8-row kernel reads them; Int8Acts::sums stays null otherwise).
Int8Acts quantize_rows(const KernelTable& k, const float* z, int ldz, int n, int batch, float** qsum,
                       bool block_sums) {
  const int blocks = act_blocks(n);
  int8_t* q = reinterpret_cast<int8_t*>(plan_scratch(5, size_t(batch) * (blocks * (kActBlock + 8) / 4 + 1)));
  float* steps = reinterpret_cast<float*>(q + size_t(batch) * blocks * kActBlock);
  int32_t* parts = reinterpret_cast<int32_t*>(steps + size_t(batch) * blocks);
  float* sums = reinterpret_cast<float*>(parts + size_t(batch) * blocks);
  for (int b = 0; b < batch; ++b) {
    int8_t* qb = q + size_t(b) * blocks * kActBlock;
    float* db = steps + size_t(b) * blocks;
    k.quantize_acts(z + size_t(b) * ldz, n, qb, db);
    if (qsum == nullptr && !block_sums) continue;  // int8 rows without tiles: no zero point, no sums
    double s = 0.0;
    for (int blk = 0; blk < blocks; ++blk) {
      int32_t part = 0;
      for (int j = 0; j < kActBlock; ++j) part += qb[blk * kActBlock + j];
      parts[size_t(b) * blocks + blk] = part;
      s += double(db[blk]) * part;
    }
    sums[b] = float(s);
  }
  if (qsum != nullptr) *qsum = sums;
  return Int8Acts{q, steps, blocks, block_sums ? parts : nullptr};
}

}  // namespace

QuipLinearPlan::QuipLinearPlan(LayerData data, KronTransform t_in, KronTransform t_out)
    : d_(std::move(data)), t_in_(std::move(t_in)), t_out_(std::move(t_out)) {
  if (d_.bits < 2 || d_.bits > 4) throw std::invalid_argument("bits must be 2, 3 or 4");
  if (d_.m < 1 || d_.n < 1) throw std::invalid_argument("layer shape must be positive");
  if (d_.row_bytes != size_t((d_.n + 7) / 8) * d_.bits)
    throw std::invalid_argument("packed row size does not match n and bits");
  const bool e8p = d_.format == CodeFormat::kE8P, grid = d_.format == CodeFormat::kGrid;
  if (e8p && d_.n % 8 != 0) throw std::invalid_argument("format e8p needs n a multiple of 8");
  if (is_trellis(d_.format) && (d_.n % kTrellisTile || d_.m % kTrellisTile))
    throw std::invalid_argument("format trellis needs m and n multiples of 16");
  const size_t scales = e8p ? size_t(d_.m) * e8p_stages(d_.bits) : size_t(d_.m);
  if (d_.scale.size() != scales || d_.zero.size() != (grid ? size_t(d_.m) : 0) ||
      d_.out_scale.size() != size_t(d_.m) || d_.in_scale.size() != size_t(d_.n) ||
      (!d_.bias.empty() && d_.bias.size() != size_t(d_.m)))
    throw std::invalid_argument("layer vectors do not match the layer shape");
  // 3 bits: two fp32 nibble passes take 1.2x the e8p GEMV's time, on int8 activations 0.6-0.7x
  if (e8p && d_.e8p_as_grid4 && (d_.bits != 3 || d_.int8_activations)) {
    for (int st = 0; st < e8p_stages(d_.bits); ++st) grid4_.push_back(e8p_stage_as_grid4(d_, st));
  }
  if (is_trellis(d_.format) && d_.trellis_as_int8) int8_rows_ = trellis_as_int8_rows(d_);
  if (gemv_int8() && (d_.row_tiles == LayerData::RowTiles::kOn ||
                      (d_.row_tiles == LayerData::RowTiles::kAuto && cpu_has_avx512_vnni()))) {
    if (gemv_on_int8_rows()) {  // the rows' only reader is the int8 GEMV: keep the tiles alone
      tiles_.push_back(tile_int8_rows(int8_rows_.view()));
      std::vector<int8_t>().swap(int8_rows_.q);
    } else if (gemv_as_grid4()) {
      for (Grid4Plane& g : grid4_) {
        tiles_.push_back(tile_codes4(g.codes.data(), size_t(d_.n / 8) * 4, d_.m, d_.n));
        std::vector<uint8_t>().swap(g.codes);
      }
    } else {
      tiles_.push_back(tile_codes4(d_.codes, d_.row_bytes, d_.m, d_.n));
    }
  }
  if (t_in_.n() != d_.n && !t_in_.identity()) throw std::invalid_argument("input transform size");
  if (t_out_.n() != d_.m && !t_out_.identity()) throw std::invalid_argument("output transform size");
  npad_ = (d_.n + 7) / 8 * 8;
  in_vec_ = d_.in_scale;
  for (float& v : in_vec_) v *= t_in_.gain();
  out_vec_ = d_.out_scale;
  for (float& v : out_vec_) v *= t_out_.gain();
}

void QuipLinearPlan::transform_in(const KernelTable& k, const float* x, int batch, float* z,
                                  float* zsum, int threads) const {
  const int n = d_.n;
  const int nt = plan_threads(threads, batch, double(batch) * n * 16);
  ThreadPool::instance().run(nt, [&](int tid) {
    int b0, b1;
    split_range(batch, nt, tid, 1, &b0, &b1);
    float* work = plan_scratch(3, size_t(n));
    for (int b = b0; b < b1; ++b) {
      const float* xr = x + size_t(b) * n;
      float* zr = z + size_t(b) * npad_;
      for (int j = 0; j < n; ++j) zr[j] = xr[j] * in_vec_[j];
      for (int j = n; j < npad_; ++j) zr[j] = 0.f;
      t_in_.apply(k, zr, work, nt == 1 ? threads : 1);
      if (zsum == nullptr) continue;
      double s = 0.0;
      for (int j = 0; j < n; ++j) s += zr[j];
      zsum[b] = float(s);
    }
  });
}

QuipLinearPlan::MatmulPath QuipLinearPlan::matmul_path(int batch) const {
  const bool gemv = batch <= kGemvMaxBatch;
  if (gemv && gemv_on_int8_rows()) return MatmulPath::kInt8Rows;
  const bool grid4 = gemv && gemv_as_grid4();
  if (d_.format == CodeFormat::kE8P && !grid4) return MatmulPath::kE8P;
  if (is_trellis(d_.format) && !grid4) return MatmulPath::kTrellis;
  if (!gemv) return MatmulPath::kGridGemm;
  return gemv_int8() ? MatmulPath::kGridGemvInt8 : MatmulPath::kGridGemv;
}

bool QuipLinearPlan::gemv_int8() const {
  return d_.int8_activations &&
         (gemv_as_grid4() || gemv_on_int8_rows() || (d_.format == CodeFormat::kGrid && d_.bits == 4));
}

bool QuipLinearPlan::matmul_is_gemv(int batch) const {
  switch (matmul_path(batch)) {
    case MatmulPath::kGridGemm: return false;
    case MatmulPath::kE8P: return batch <= e8p_gemv_max_batch(d_.bits);
    case MatmulPath::kTrellis: return batch <= kGemvMaxBatch;
    default: return true;
  }
}

int QuipLinearPlan::gemv_extra_floats(int batch) const {
  return grid4_.size() > 1 ? batch * d_.m : 0;
}

// int8 activations (quantized by the caller's thread, read by every pool thread), int8 rows'
// block order, e8p's group sums: scratch slots 4 and 5, so valid until the caller's next call.
QuipLinearPlan::GemvInput QuipLinearPlan::gemv_input(const KernelTable& k, const float* z,
                                                     const float* zsum, int batch) const {
  GemvInput in{matmul_path(batch), batch, z, zsum, Int8Acts{nullptr, nullptr, 0, nullptr}, nullptr, nullptr, 0, nullptr};
  if (in.path == MatmulPath::kInt8Rows) {
    if (gemv_int8()) {
      in.acts = quantize_rows(k, z, npad_, d_.n, batch, nullptr, !tiles_.empty());
    } else {
      in.len = int8_rows_.blocks * kActBlock;
      float* zp = plan_scratch(5, size_t(batch) * in.len);
      for (int b = 0; b < batch; ++b) permute_acts(z + size_t(b) * npad_, d_.n, zp + size_t(b) * in.len);
      in.zp = zp;
    }
  } else if (in.path == MatmulPath::kGridGemvInt8) {
    float* qsum = nullptr;
    in.acts = quantize_rows(k, z, npad_, d_.n, batch, &qsum, false);
    in.qsum = qsum;
  } else if (in.path == MatmulPath::kE8P) {  // the GEMV's shift term: 1/4 * the sums of z over each group
    const int groups = d_.n / 8;
    float* gsum = plan_scratch(4, size_t(batch) * groups);
    for (int b = 0; b < batch; ++b)
      for (int g = 0; g < groups; ++g) {
        const float* zg = z + size_t(b) * npad_ + 8 * g;
        gsum[size_t(b) * groups + g] =
            0.25f * (((zg[0] + zg[1]) + (zg[2] + zg[3])) + ((zg[4] + zg[5]) + (zg[6] + zg[7])));
      }
    in.gsum = gsum;
  }
  return in;
}

void QuipLinearPlan::gemv_rows(const KernelTable& k, const GemvInput& in, int i0, int i1, float* t,
                               float* extra) const {
  const int batch = in.batch;
  switch (in.path) {
    case MatmulPath::kInt8Rows: {
      if (!tiles_.empty()) return k.tiles8_i8(tiles_[0].view(), i0, i1, in.acts, batch, t, d_.m);
      const Int8Rows w = int8_rows_.view();
      if (in.acts.q != nullptr)
        k.gemv8_i8(w, i0, i1, in.acts, batch, t, d_.m);
      else
        k.gemv8(w, i0, i1, in.zp, in.len, batch, t, d_.m);
      return;
    }
    case MatmulPath::kE8P: {  // up to kGemvMaxBatch activation vectors per pass over the rows' codes
      const E8PCodes codes{d_.codes, d_.row_bytes, d_.bits, d_.m, d_.n, d_.scale.data()};
      const int groups = d_.n / 8;
      for (int b0 = 0; b0 < batch; b0 += kGemvMaxBatch) {
        const int nb = std::min(kGemvMaxBatch, batch - b0);
        k.e8p_gemv(codes, i0, i1, in.z + size_t(b0) * npad_, npad_, in.gsum + size_t(b0) * groups, nb,
                   t + size_t(b0) * d_.m, d_.m);
      }
      return;
    }
    case MatmulPath::kTrellis:
      k.trellis_gemv(trellis_codes(d_), i0, i1, in.z, npad_, batch, t, d_.m);
      return;
    default: break;
  }
  // The grid GEMV: the layer's grid codes, or its e8p stages as 4-bit grid codes, summed (stage 1
  // into `extra`, added row by row by the thread that computed both)
  const bool grid4 = gemv_as_grid4();
  const int stages = grid4 ? int(grid4_.size()) : 1;
  for (int st = 0; st < stages; ++st) {
    const Codes codes = grid4 ? Codes{grid4_[size_t(st)].codes.data(), size_t(d_.n / 8) * 4, 4, d_.m, d_.n}
                              : Codes{d_.codes, d_.row_bytes, d_.bits, d_.m, d_.n};
    const RowAffine aff = grid4 ? RowAffine{grid4_[size_t(st)].scale.data(), grid4_[size_t(st)].zero.data()}
                                : RowAffine{d_.scale.data(), d_.zero.data()};
    float* out = st ? extra : t;
    if (!tiles_.empty())
      k.tiles4_i8(tiles_[size_t(st)].view(), aff, i0, i1, in.acts, in.qsum, batch, out, d_.m);
    else if (in.path == MatmulPath::kGridGemvInt8)
      k.qgemv4_i8(codes, aff, i0, i1, in.acts, in.qsum, batch, out, d_.m);
    else
      k.qgemv(codes, aff, i0, i1, in.z, npad_, in.zsum, batch, out, d_.m);
  }
  if (stages > 1)
    for (int b = 0; b < batch; ++b)
      for (int i = i0; i < i1; ++i) t[size_t(b) * d_.m + i] += extra[size_t(b) * d_.m + i];
}

void QuipLinearPlan::matmul(const KernelTable& k, const float* z, const float* zsum, int batch,
                            float* t, int threads) const {
  if (!matmul_is_gemv(batch)) return matmul_gemm(k, matmul_path(batch), z, zsum, batch, t, threads);
  const GemvInput in = gemv_input(k, z, zsum, batch);
  const int extra_floats = gemv_extra_floats(batch);
  float* extra = extra_floats ? plan_scratch(6, size_t(extra_floats)) : nullptr;
  over_rows(d_.m, d_.n, batch, gemv_row_align(), threads, [&](int i0, int i1) { gemv_rows(k, in, i0, i1, t, extra); });
}

void QuipLinearPlan::matmul_gemm(const KernelTable& k, MatmulPath path, const float* z, const float* zsum,
                                 int batch, float* t, int threads) const {
  if (path == MatmulPath::kE8P) {
    const E8PCodes codes{d_.codes, d_.row_bytes, d_.bits, d_.m, d_.n, d_.scale.data()};
    over_rows(d_.m, d_.n, batch, kGemmNR, threads, [&](int i0, int i1) {
      Buffer work = alloc_floats(qgemm_work_floats(batch));
      k.e8p_gemm(codes, i0, i1, z, npad_, batch, t, d_.m, work.get());
    });
  } else if (path == MatmulPath::kTrellis) {
    const TrellisCodes codes = trellis_codes(d_);
    over_rows(d_.m, d_.n, batch, kGemmNR, threads, [&](int i0, int i1) {
      Buffer work = alloc_floats(qgemm_work_floats(batch));
      k.trellis_gemm(codes, i0, i1, z, npad_, batch, t, d_.m, work.get());
    });
  } else {  // kGridGemm
    over_rows(d_.m, d_.n, batch, kGemmNR, threads, [&](int i0, int i1) {
      Buffer work = alloc_floats(qgemm_work_floats(batch));
      k.qgemm(Codes{d_.codes, d_.row_bytes, d_.bits, d_.m, d_.n}, RowAffine{d_.scale.data(), d_.zero.data()},
              i0, i1, z, npad_, zsum, batch, t, d_.m, work.get());
    });
  }
}

void QuipLinearPlan::transform_out(const KernelTable& k, float* t, int batch, float* y,
                                   int threads) const {
  const int m = d_.m;
  const int nt = plan_threads(threads, batch, double(batch) * m * 16);
  const float* bias = d_.bias.empty() ? nullptr : d_.bias.data();
  ThreadPool::instance().run(nt, [&](int tid) {
    int b0, b1;
    split_range(batch, nt, tid, 1, &b0, &b1);
    float* work = plan_scratch(3, size_t(m));
    for (int b = b0; b < b1; ++b) {
      float* tr = t + size_t(b) * m;
      t_out_.apply(k, tr, work, nt == 1 ? threads : 1);
      float* yr = y + size_t(b) * m;
      if (bias)
        for (int i = 0; i < m; ++i) yr[i] = out_vec_[i] * tr[i] + bias[i];
      else
        for (int i = 0; i < m; ++i) yr[i] = out_vec_[i] * tr[i];
    }
  });
}

void QuipLinearPlan::forward(const float* x, int batch, float* y, int threads,
                             bool force_scalar) const {
  if (batch <= 0) return;
  const KernelTable& k = select_kernels(force_scalar);
  // The caller's thread owns slots 0-2 and 4-6 for the whole call; pool threads use slot 3 only.
  float* z = plan_scratch(0, size_t(batch) * npad_);
  float* zsum = needs_zsum(batch) ? plan_scratch(1, size_t(batch)) : nullptr;
  float* t = plan_scratch(2, size_t(batch) * d_.m);
  transform_in(k, x, batch, z, zsum, threads);
  matmul(k, z, zsum, batch, t, threads);
  transform_out(k, t, batch, y, threads);
}

}  // namespace quipc
