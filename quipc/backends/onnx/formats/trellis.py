"""The trellis formats ("trellis", "trellis256": one layout, two code tables) in ONNX (meaning:
quipc_runtime.formats.trellis), standard ops only.

A tile's stream is its 32 k bytes (tile rows side by side). Weight t's state is the L-bit
window at bit k t, so it lies in the 3 bytes from byte (k t) // 8 (L + 7 <= 24), circularly:
    word  = B[i0] << 16 | B[i1] << 8 | B[i2]
    state = (word >> (24 - L - (k t) % 8)) & (2^L - 1)
with the byte indices and shifts constants of k. The states index the code table (a
Constant of 2^L floats), the tiles go back to rows, and the row scales multiply:
    W' = scale * CODE[state];  W' z = MatMul(z, W'^T).
The decode depends on initializers only, so onnxruntime folds it once at session creation
(mode "unpack", like the other formats' standard-op mode): the file holds the trellis codes,
the session a dense W'. Below opset 18 (no bitwise ops) the word is an int64 sum and the
window an integer Div / Mod.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from onnx import TensorProto

from quipc_runtime.formats.trellis import SEQ, STATE_BITS, TILE, code_table

from ..builder import Builder
from . import Lowering, register_lowering
from .nbits import BITWISE_OPSET, FLOAT, uints

L = STATE_BITS


@lru_cache(maxsize=None)
def window_constants(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(256, 3) byte indices and (256,) right shifts of each weight's window in its tile's stream."""
    start = k * np.arange(SEQ)
    nbytes = SEQ * k // 8
    idx = (start[:, None] // 8 + np.arange(3)[None, :]) % nbytes
    return idx.astype(np.int64), (24 - L - start % 8).astype(np.int64)


def plan(layer, ops: str, native_2bit: bool) -> tuple[str, int]:
    return "unpack", 0


def _states(b: Builder, stream: str, k: int) -> str:
    """(rt, ct, 32 k) uint8 streams -> (rt, ct, 256) int64 states."""
    idx, shift = window_constants(k)
    got = b.op("Gather", stream, b.const(idx), axis=2)                                  # (rt, ct, 256, 3)
    if b.opset >= BITWISE_OPSET:
        parts = b.op("BitShift", b.op("Cast", got, to=TensorProto.UINT32), uints(b, [16, 8, 0], np.uint32),
                     direction="LEFT")
        bytes3 = b.op("Split", parts, axis=3, outputs=3, num_outputs=3)
        word = b.op("BitwiseOr", b.op("BitwiseOr", bytes3[0], bytes3[1]), bytes3[2])     # (rt, ct, 256, 1)
        word = b.op("Reshape", word, b.ints([0, 0, SEQ]))
        state = b.op("BitShift", word, b.const(shift.astype(np.uint32)), direction="RIGHT")
        state = b.op("BitwiseAnd", state, uints(b, [(1 << L) - 1], np.uint32))
        return b.op("Cast", state, to=TensorProto.INT64)
    word = b.op("ReduceSum", b.op("Mul", b.op("Cast", got, to=TensorProto.INT64), b.ints([1 << 16, 1 << 8, 1])),
                b.ints([3]), keepdims=0)                                                # (rt, ct, 256)
    return b.op("Mod", b.op("Div", word, b.const(np.int64(1) << shift)), b.ints([1 << L]))


def _dequantizer(name: str):
    def dequantize(b: Builder, k: int, w: dict, m: str, lit: dict) -> str:
        """W' (m, n) float32 of whole tiles (m a multiple of 16): scale * CODE[state]."""
        ct = b.op("Div", b.attr_int("in_features", lit.get("in_features")), b.ints([TILE]))
        tiles = b.op("Reshape", w["codes"], b.op("Concat", b.ints([-1, TILE]), ct, b.ints([2 * k]), axis=0))
        stream = b.op("Reshape", b.op("Transpose", tiles, perm=[0, 2, 1, 3]),
                      b.op("Concat", b.ints([-1]), ct, b.ints([SEQ * k // 8]), axis=0))    # (rt, ct, 32 k)
        values = b.op("Gather", b.table(f"quipc.{name}.code", code_table(name)), _states(b, stream, k), axis=0)
        values = b.op("Reshape", values, b.op("Concat", b.ints([-1]), ct, b.ints([TILE, TILE]), axis=0))
        rows = b.op("Reshape", b.op("Transpose", values, perm=[0, 2, 1, 3]),
                    b.op("Concat", m, b.ints([-1]), axis=0))                                # (m, n)
        return b.op("Mul", rows, b.op("Cast", w["scale"], to=FLOAT))
    return dequantize


def _lowering(name: str) -> Lowering:
    dequantize = _dequantizer(name)

    def weight_product(b: Builder, v, z: str, w: dict, m: str, lit: dict) -> str:
        """W' z for the m rows of codes / scale (m, 1)."""
        return b.op("MatMul", z, b.op("Transpose", dequantize(b, v.bits, w, m, lit), perm=[1, 0]))

    return register_lowering(Lowering(name, ("codes", "scale"), plan, weight_product, dequantize))


TRELLIS = _lowering("trellis")
TRELLIS256 = _lowering("trellis256")
