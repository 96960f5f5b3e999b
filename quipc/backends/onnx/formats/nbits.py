"""Helpers shared by the lowerings: onnxruntime's MatMulNBits with a per-row scale, and the
integer ops that build its 4-bit nibbles."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..builder import MS_DOMAIN, Builder, Ref

FLOAT = TensorProto.FLOAT
INT = 2   # onnx.AttributeProto.INT
NBITS_BITS = (2, 4)      # onnxruntime's CPU MatMulNBits kernel: 2, 4 (and 8) bits
# Measured on this CPU (onnxruntime 1.32, accuracy_level 4, one 576x1536 / 1536x576 GEMV):
# 4-bit 56-90 us, 2-bit block 64 195 us, 2-bit block 256 9.6 ms (a slow fallback). So 2-bit
# layers are widened to 4-bit nibbles in memory at session creation (the file keeps 2 bits)
# unless native_2bit is asked for.
MAX_BLOCK = 256          # 2-bit MatMulNBits refuses larger blocks
BITWISE_OPSET = 18       # BitShift on uint8 with BitwiseAnd / BitwiseOr / BitwiseXor


def nbits_block_size(n: int, bits: int) -> int:
    """Largest power-of-two block (16..256) dividing n, or 0 when MatMulNBits cannot be used."""
    if bits not in NBITS_BITS:
        return 0
    bs = MAX_BLOCK
    while bs >= 16:
        if n % bs == 0:
            return bs
        bs //= 2
    return 0


def attr(b: Builder, lit: dict, key: str):
    """An int attribute: the caller's (a reference) in a function, the literal in a graph."""
    return Ref(key, INT) if b.function else int(lit[key])


def uints(b: Builder, values, dtype) -> str:
    return b.const(np.asarray(values, dtype))


def nibbles(b: Builder, vals: str, m: str) -> str:
    """(m, n/2) uint8 bytes (code 2k in the low nibble, 2k+1 in the high) from (m, n) codes."""
    pairs = b.op("Reshape", vals, b.op("Concat", m, b.ints([-1, 2]), axis=0))
    if b.opset < BITWISE_OPSET:
        return b.op("Cast", b.op("ReduceSum", b.op("Mul", pairs, b.ints([1, 16])), b.ints([2]), keepdims=0),
                    to=TensorProto.UINT8)
    lo, hi = b.op("Split", pairs, axis=2, outputs=2, num_outputs=2)
    hi = b.op("BitShift", hi, uints(b, [4], np.uint8), direction="LEFT")
    return b.op("Squeeze", b.op("BitwiseOr", lo, hi), b.ints([2]))


def blocks(b: Builder, packed: str, m: str, lit: dict, kbits: int | str) -> str:
    """(m, K/8*kbits) packed bytes -> MatMulNBits' (m, K/block, block*kbits/8) layout;
    kbits: an int, or "bits" (the node's bits attribute)."""
    width = b.attr_int("bits", lit.get("bits")) if kbits == "bits" else b.ints([kbits])
    blob = b.op("Div", b.op("Mul", b.attr_int("block_size", lit.get("block_size")), width), b.ints([8]))
    return b.op("Reshape", packed, b.op("Concat", m, b.ints([-1]), blob, axis=0))


def matmul_nbits(b: Builder, z: str, packed: str, scale_f: str, m: str, kbits: int | str, lit: dict) -> str:
    """z W^T for W[i, j] = scale_f[i] * (q[i, j] - 2^(kbits-1)) (MatMulNBits' default zero
    point); packed: blocks(...) of the codes q; kbits as for blocks."""
    kb = b.op("Slice", b.op("Shape", packed), b.ints([1]), b.ints([2]))
    scales = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", scale_f, b.ints([1])),
                                  b.op("Concat", m, kb, axis=0)), b.ints([-1]))
    y = b.op("MatMulNBits", z, packed, scales, domain=MS_DOMAIN,
             K=attr(b, lit, "in_features"), N=attr(b, lit, "out_features"),
             bits=attr(b, lit, "bits") if kbits == "bits" else kbits,
             block_size=attr(b, lit, "block_size"), accuracy_level=attr(b, lit, "accuracy_level"))
    return b.op("Cast", y, to=FLOAT)   # types the contrib op's output for ONNX shape inference


def times_row_sums(b: Builder, z: str, corr: str) -> str:
    """sum(z) * corr: the rank-one term of a per-row offset (corr: (m,) float)."""
    return b.op("Mul", b.op("ReduceSum", z, b.ints([-1]), keepdims=1), corr)
