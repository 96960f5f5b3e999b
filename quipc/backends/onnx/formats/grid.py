"""The "grid" format in ONNX: W'[i, j] = scale[i] * code[i, j] + zero[i], `bits` bytes per 8
codes (quipc_runtime.formats.grid).

Modes (the body's weight product):
- "nbits" (4 bits, or 2 with native_2bit; n a multiple of 16): the packed codes are already
  MatMulNBits' layout (row-major, lowest bits first), reshaped to blocks; the per-row scale is
  repeated per block and the default zero point 2^(bits-1) is corrected by a rank-one term:
  W' z = MatMulNBits(z) + (zero + 2^(bits-1) * scale) * sum(z).
- "repack4" (2 and 3 bits, n a multiple of 16): the dense codes are unpacked in the graph and
  re-packed as 4-bit nibbles for MatMulNBits (bits=4), with the 4-bit correction (zero + 8 scale).
  The file keeps the dense 2/3-bit codes; only the session's memory holds nibbles.
- "unpack" (any bits, standard ops only): the dense packed bytes are unpacked with integer
  arithmetic (8 codes from `bits` bytes), dequantized, and multiplied.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..builder import Builder
from . import Lowering, register_lowering
from .nbits import (BITWISE_OPSET, FLOAT, blocks, matmul_nbits, nbits_block_size, nibbles, times_row_sums,
                    uints)


def plan(layer, ops: str, native_2bit: bool) -> tuple[str, int]:
    if ops != "quip":
        return "unpack", 0
    native = layer.bits == 4 or (layer.bits == 2 and native_2bit)
    block = nbits_block_size(layer.in_features, layer.bits if native else 4)
    if native and layer.bits == 2:
        block = min(block, 128)   # 2-bit blocks of 256 hit a slow kernel
    if not block:
        return "unpack", 0
    return ("nbits" if native else "repack4"), block


def unpack_codes(b: Builder, codes: str, bits: int, m: str, lit: dict) -> str:
    """(m, n) integer codes from the dense packed bytes. onnxruntime folds this once per
    session for every layer at the same time, so the intermediates' width is the session's
    peak memory: with bitwise ops (opset >= 18) they stay at 1 byte per code (4 for 3 bits);
    the int64 arithmetic fallback for older opsets needs 8."""
    if b.opset < BITWISE_OPSET:
        return _unpack_codes_int64(b, codes, bits, m, lit)
    if 8 % bits == 0:   # 2 and 4 bits: whole codes in each byte, lowest bits first
        shifts = uints(b, [bits * j for j in range(8 // bits)], np.uint8)
        vals = b.op("BitShift", b.op("Unsqueeze", codes, b.ints([-1])), shifts, direction="RIGHT")
        vals = b.op("BitwiseAnd", vals, uints(b, [(1 << bits) - 1], np.uint8))            # (m, R, 8/bits)
    else:               # 3 bits: 8 codes in 3 bytes, read as one little-endian uint32 word
        groups = b.op("Cast", b.op("Reshape", codes, b.op("Concat", m, b.ints([-1, 3]), axis=0)),
                      to=TensorProto.UINT32)                                              # (m, G, 3)
        parts = b.op("Split", b.op("BitShift", groups, uints(b, [0, 8, 16], np.uint32), direction="LEFT"),
                     axis=2, outputs=3, num_outputs=3)
        word = b.op("BitwiseOr", b.op("BitwiseOr", parts[0], parts[1]), parts[2])         # (m, G, 1)
        vals = b.op("BitShift", word, uints(b, [3 * j for j in range(8)], np.uint32), direction="RIGHT")
        vals = b.op("Cast", b.op("BitwiseAnd", vals, uints(b, [7], np.uint32)), to=TensorProto.UINT8)
    vals = b.op("Reshape", vals, b.op("Concat", m, b.ints([-1]), axis=0))
    return b.op("Slice", vals, b.ints([0]), b.attr_int("in_features", lit.get("in_features")), b.ints([1]))


def _unpack_codes_int64(b: Builder, codes: str, bits: int, m: str, lit: dict) -> str:
    """(m, n) int64 codes with integer arithmetic only (any opset >= 13)."""
    groups = b.op("Reshape", codes, b.op("Concat", m, b.ints([-1, bits]), axis=0))       # (m, G, bits)
    words = b.op("Mul", b.op("Cast", groups, to=TensorProto.INT64), b.ints([256 ** k for k in range(bits)]))
    words = b.op("ReduceSum", words, b.ints([2]), keepdims=1)                            # (m, G, 1)
    vals = b.op("Div", words, b.ints([1 << (bits * j) for j in range(8)]))
    vals = b.op("Mod", vals, b.ints([1 << bits]))                                        # (m, G, 8)
    vals = b.op("Reshape", vals, b.op("Concat", m, b.ints([-1]), axis=0))
    return b.op("Slice", vals, b.ints([0]), b.attr_int("in_features", lit.get("in_features")), b.ints([1]))


def dequantize(b: Builder, bits: int, w: dict, m: str, lit: dict) -> str:
    """W' (m, n) float32: scale * code + zero per row."""
    vals = b.op("Cast", unpack_codes(b, w["codes"], bits, m, lit), to=FLOAT)
    return b.op("Add", b.op("Mul", vals, b.op("Unsqueeze", b.op("Cast", w["scale"], to=FLOAT), b.ints([1]))),
                b.op("Unsqueeze", b.op("Cast", w["zero"], to=FLOAT), b.ints([1])))


def weight_product(b: Builder, v, z: str, w: dict, m: str, lit: dict) -> str:
    """W' z for the m rows of codes/scale/zero (m: out_features, the total in a group)."""
    if v.mode == "unpack":
        return b.op("MatMul", z, b.op("Transpose", dequantize(b, v.bits, w, m, lit), perm=[1, 0]))
    scale_f = b.op("Cast", w["scale"], to=FLOAT)
    zero_f = b.op("Cast", w["zero"], to=FLOAT)
    if v.mode == "nbits":   # the quipc layout is MatMulNBits' layout: only reshaped
        packed, kbits = blocks(b, w["codes"], m, lit, "bits"), "bits"
        half = b.op("Pow", b.const(np.float32(2)), b.op(
            "Cast", b.op("Sub", b.attr_int("bits", lit.get("bits")), b.ints([1])), to=FLOAT))
    else:   # 2/3-bit: unpacked and re-packed as 4-bit nibbles (folded once, at session creation)
        packed = blocks(b, nibbles(b, unpack_codes(b, w["codes"], v.bits, m, lit), m), m, lit, 4)
        kbits, half = 4, b.const(np.float32(8))
    y = matmul_nbits(b, z, packed, scale_f, m, kbits, lit)
    return b.op("Add", y, times_row_sums(b, z, b.op("Add", zero_f, b.op("Mul", scale_f, half))))


GRID = register_lowering(Lowering("grid", ("codes", "scale", "zero"), plan, weight_product, dequantize,
                                  ms_modes=("nbits", "repack4")))
