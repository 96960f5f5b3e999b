// Kernel entry points shared by the scalar and AVX2 builds.
// Every function works on raw pointers only: the AVX2 translation unit must not
// instantiate std templates that the linker could merge into the portable path.
#pragma once
#include <cstddef>
#include <cstdint>

namespace quipc {

// Packed codes of one layer (artifact layout, see packing.py).
struct Codes {
  const uint8_t* data;  // m rows of row_bytes
  size_t row_bytes;
  int bits;             // 2, 3 or 4
  int m, n;             // out, in features
};

// Per-row epilogue of the quantized matmul: t = scale*(codes . z) + zero*sum(z).
struct RowAffine {
  const float* scale;   // (m)
  const float* zero;    // (m)
};

// Activations quantized to int8 for the 4-bit GEMV (LayerData::int8_activations), as
// llama.cpp's Q8_0 and onnxruntime's accuracy_level 4: per batch row, blocks of kActBlock
// values, each block one float step d (max |z| / 127) and its values round(z / d), stored as
// the block's 16 even positions then its 16 odd ones (the order of a 4-bit code row's low and
// high nibbles, so a block's 16 code bytes meet their activations without a shuffle).
constexpr int kActBlock = 32;
struct Int8Acts {
  const int8_t* q;       // (nb, blocks * kActBlock)
  const float* d;        // (nb, blocks)
  int blocks;            // ceil(n / kActBlock); values past n are zero
  const int32_t* sums = nullptr;  // (nb, blocks): each block's sum of q (read by tiles8_i8)
};
inline int act_blocks(int n) { return (n + kActBlock - 1) / kActBlock; }

// A layer's W' as int8 rows (trellis_as_int8.h): W'[i, :] ~ step[i] * q[i, :], |q| <= 127, each
// row act_blocks(n) * kActBlock bytes in Int8Acts' block order (a block's 16 even positions,
// then its 16 odd ones; zero past n), so that a block of weights meets its int8 activations
// without a shuffle; the fp32 GEMV reads z permuted to the same order (permute_acts).
struct Int8Rows {
  const int8_t* q;    // (m, blocks * kActBlock)
  const float* step;  // (m)
  int m, n, blocks;   // blocks = act_blocks(n)
};
// One row of z (n values) -> blocks * kActBlock floats in Int8Acts' block order, zero past n.
void permute_acts(const float* z, int n, float* out);

// Row tiles (row_tiles.h): the rows of 4-bit codes (Codes' layout, bits = 4) or of int8 rows
// (Int8Rows) regrouped kTileRows at a time, so that one 64-byte load holds 4 bytes of each of
// 16 rows and one vpdpbusd (AVX-512 VNNI) adds 4 products to each row's int32 lane: no
// horizontal sums. Tile r0 / kTileRows, block blk, quad k (bytes 4k..4k+3 of the row's block,
// in Codes' or Int8Rows' byte order), row r0 + r: 4 bytes at
//   data + ((tile * blocks + blk) * quads + k) * 64 + 4 * r,
// quads = 4 (4-bit codes: a byte's low nibble meets the block's activation slot 4k + j, its
// high nibble slot 16 + 4k + j) or 8 (int8 rows, stored + 128 as unsigned bytes: vpdpbusd
// multiplies unsigned by signed bytes, and 128 * the block's activation sum comes off exactly).
// Rows past m and blocks past n are zero.
constexpr int kTileRows = 16;
struct RowTiles {
  const uint8_t* data;
  int m, n, blocks, quads;  // blocks = act_blocks(n); quads = 4 (4-bit codes) or 8 (int8 rows)
  const float* step;        // int8 rows: (m) row steps; 4-bit codes: null (RowAffine instead)
};

struct E8PCodes;      // e8p.h
struct TrellisCodes;  // trellis.h

struct KernelTable {
  const char* name;
  // t[b*ldt + i] for i in [i0, i1), b < nb (nb <= 4): one pass over the codes.
  void (*qgemv)(const Codes&, const RowAffine&, int i0, int i1, const float* z, int ldz,
                const float* zsum, int nb, float* t, int ldt);
  // One row of activations z (n values) -> its int8 blocks q (act_blocks(n) * kActBlock) and steps d.
  void (*quantize_acts)(const float* z, int n, int8_t* q, float* d);
  // qgemv for 4-bit codes on int8 activations (nb <= 4): per block an exact integer dot
  // product of codes and q, scaled by the block's step; zsum: the row sums of the quantized
  // activations (sum over blocks of d * sum q), so that the zero-point term cancels exactly.
  void (*qgemv4_i8)(const Codes&, const RowAffine&, int i0, int i1, const Int8Acts& a,
                    const float* zsum, int nb, float* t, int ldt);
  // Same for any batch: panels of codes dequantized into an fp32 tile (work holds
  // qgemm_work_floats(nbatch) floats, 32-byte aligned) and multiplied by a register-blocked micro-kernel.
  void (*qgemm)(const Codes&, const RowAffine&, int i0, int i1, const float* z, int ldz,
                const float* zsum, int nbatch, float* t, int ldt, float* work);
  // Unnormalized Walsh-Hadamard transform along the middle axis of x viewed (pre, f, post).
  void (*fwht)(float* x, int pre, int f, int post);
  // C (MxN) = A (MxK) * B (KxN), all row-major.
  void (*gemm_f32)(int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                   float* C, int ldc);
  // Format "e8p" (e8p.h): fused decode + GEMV (nb <= 4) and decode-panel + GEMM.
  void (*e8p_gemv)(const E8PCodes&, int i0, int i1, const float* z, int ldz, const float* gsum,
                   int nb, float* t, int ldt);
  void (*e8p_gemm)(const E8PCodes&, int i0, int i1, const float* z, int ldz, int nbatch, float* t,
                   int ldt, float* work);
  // Format "trellis" (trellis.h): states + code gather + FMA GEMV (nb <= 4), decode-panel + GEMM.
  void (*trellis_gemv)(const TrellisCodes&, int i0, int i1, const float* z, int ldz, int nb, float* t,
                       int ldt);
  void (*trellis_gemm)(const TrellisCodes&, int i0, int i1, const float* z, int ldz, int nbatch,
                       float* t, int ldt, float* work);
  // Int8 rows (Int8Rows): t[b*ldt + i] = step[i] * (q[i, :] . zp[b, :]) for i in [i0, i1), b < nb
  // (nb <= 4), zp the rows of z in block order (permute_acts, ldz apart) ...
  void (*gemv8)(const Int8Rows&, int i0, int i1, const float* zp, int ldz, int nb, float* t, int ldt);
  // ... and on int8 activations: per block an exact integer dot product scaled by its step.
  void (*gemv8_i8)(const Int8Rows&, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt);
  // Row tiles (RowTiles, nb <= 4, i0 a multiple of kTileRows): qgemv4_i8 on tiled 4-bit codes,
  // and gemv8_i8 on tiled int8 rows (a.sums required); the same integer dot products per block.
  void (*tiles4_i8)(const RowTiles&, const RowAffine&, int i0, int i1, const Int8Acts& a,
                    const float* zsum, int nb, float* t, int ldt);
  void (*tiles8_i8)(const RowTiles&, int i0, int i1, const Int8Acts& a, int nb, float* t, int ldt);
};

constexpr int kGemmNR = 16;   // output features per micro-panel
constexpr int kGemmMR = 6;    // batch rows per micro-kernel call
constexpr int kGemmKC = 256;  // input features per panel (multiple of 8)
constexpr size_t kGemmWork = size_t(kGemmNR) * kGemmKC;
// Scratch floats qgemm needs: the code panel plus the packed activation slice.
inline size_t qgemm_work_floats(int nbatch) {
  return kGemmWork + size_t((nbatch + kGemmMR - 1) / kGemmMR) * kGemmMR * kGemmKC;
}

const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();  // only valid when cpu_has_avx2_fma()
bool cpu_has_avx2_fma();  // AVX2, FMA and BMI2
// AVX-512 F, BW and VNNI (the row tiles' kernels), unless QUIPC_NO_AVX512 is set non-empty, not "0"
bool cpu_has_avx512_vnni();
// The table to use: AVX2 unless the CPU lacks it, force_scalar is set, or the
// environment variable QUIPC_FORCE_SCALAR is set to a non-empty value other than "0".
const KernelTable& select_kernels(bool force_scalar);

}  // namespace quipc
