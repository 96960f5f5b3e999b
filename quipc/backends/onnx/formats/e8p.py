"""The "e8p" format in ONNX (meaning: quipc_runtime.formats.e8p and .lattice).

Every coordinate of an E8P point is (+-)(1/2, 3/2, 5/2 or 7/2) + (+-)1/4, i.e. one of the 16
values 0.5 * (q - 8) + 0.25, q = 0..15; every coordinate of an E8 one-bit point is one of
0, +-1/2, +-1, +-2, i.e. 0.5 * (q - 8) with q = 4..12. So each stage of a layer is exactly a
4-bit grid with a per-row scale (0.5 * scale[i, stage]) and a per-row offset, which is what
onnxruntime's 4-bit MatMulNBits runs (its fastest CPU kernel, as the grid's "repack4" mode).

The body turns each group's indices into 4-bit codes with integer ops only: for an E8P index
with low byte lo (the source) and high byte hi (7 sign bits, the shift bit)
    q = TA[lo] xor TB[hi]     (uint8, one Gather each from a 256 x 8 table)
where TA[lo] = 2|x| xor 8 (coordinate 7 also xor 14 when the source's parity is odd) and
TB[hi] = 14 on each negative coordinate (coordinate 7: the parity of hi's 7 sign bits), xor 1
on every coordinate when the shift is -1/4. (2|x| is odd, so 8 + 2|x| = 2|x| xor 8,
8 - 2|x| = 2|x| xor 6 = (2|x| xor 8) xor 14, and q - 1 = q xor 1.) A one-bit index b: q = T1[b].
Below opset 18 (no BitwiseXor) q = 8 + SA[lo] * SB[hi] - SH[hi] in int64.

Modes:
- "repack4" (n a multiple of 16, ops='quip'): per stage, the codes as nibbles -> MatMulNBits
  (bits=4), the stages' outputs summed, plus the rank-one offset 0.25 * (sum of the E8P stages'
  scales) * sum(z). The decode depends on initializers only: onnxruntime folds it once at
  session creation, so the session holds 4 bits per weight and stage, the file the E8P codes.
- "unpack" (standard ops only): W' = sum_s scale[:, s] * (0.5 * q_s - offset_s), folded the
  same way, then one MatMul.
The tables are Constants of the function body (once per overload in the file; an inlined
body, ops='std', reads them as shared initializers quipc.e8p.*).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from onnx import TensorProto

from quipc_runtime.formats.e8p import STAGES
from quipc_runtime.formats.lattice import e8_one_bit_table, e8p_source_parity, e8p_sources

from ..builder import Builder
from . import Lowering, register_lowering
from .nbits import BITWISE_OPSET, FLOAT, blocks, matmul_nbits, nbits_block_size, nibbles, times_row_sums

OFFSET = {"e8p": 0.25, "e8_1bit": 0.0}   # value = 0.5 * (q - 8) + OFFSET
BYTES = {"e8p": 2, "e8_1bit": 1}


def _bits_of(i: np.ndarray) -> np.ndarray:
    """(256, 8) uint8: the bits of 0..255, lowest first."""
    return ((i[:, None] >> np.arange(8)) & 1).astype(np.uint8)


@lru_cache(maxsize=None)
def xor_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TA, TB, T1 (256 x 8 uint8) of the bitwise decode (see the module docstring)."""
    i = np.arange(256)
    ta = (np.rint(2 * e8p_sources()).astype(np.uint8) ^ 8)
    ta[:, 7] ^= 14 * e8p_source_parity()
    hi = _bits_of(i)
    neg = np.concatenate([hi[:, :7], (hi[:, :7].sum(1) % 2)[:, None]], axis=1).astype(np.uint8)
    tb = (14 * neg) ^ hi[:, 7:8]
    t1 = np.rint(2 * e8_one_bit_table() + 8).astype(np.uint8)
    return ta, tb.astype(np.uint8), t1


@lru_cache(maxsize=None)
def arithmetic_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SA, SB, SH, T1 (int64) of the decode without bitwise ops."""
    sa = np.rint(2 * e8p_sources()).astype(np.int64)
    sa[:, 7] *= 1 - 2 * e8p_source_parity().astype(np.int64)
    hi = _bits_of(np.arange(256)).astype(np.int64)
    neg = np.concatenate([hi[:, :7], (hi[:, :7].sum(1) % 2)[:, None]], axis=1)
    return sa, 1 - 2 * neg, hi[:, 7:8].copy(), np.rint(2 * e8_one_bit_table() + 8).astype(np.int64)


def plan(layer, ops: str, native_2bit: bool) -> tuple[str, int]:
    block = nbits_block_size(layer.in_features, 4) if ops == "quip" else 0
    return ("repack4", block) if block else ("unpack", 0)


def _table(b: Builder, name: str, arr: np.ndarray) -> str:
    return b.table(f"quipc.e8p.{name}", arr)


def _gather(b: Builder, table: str, col: str) -> str:
    return b.op("Gather", table, b.op("Cast", col, to=TensorProto.INT64), axis=0)     # (m, G, 1, 8)


def _e8p_codes(b: Builder, lo: str, hi: str) -> str:
    if b.opset >= BITWISE_OPSET:
        ta, tb, _ = xor_tables()
        return b.op("BitwiseXor", _gather(b, _table(b, "ta", ta), lo), _gather(b, _table(b, "tb", tb), hi))
    sa, sb, sh, _ = arithmetic_tables()
    prod = b.op("Mul", _gather(b, _table(b, "sa", sa), lo), _gather(b, _table(b, "sb", sb), hi))
    return b.op("Sub", b.op("Add", prod, b.ints(8)), _gather(b, _table(b, "sh", sh), hi))


def stage_codes(b: Builder, codes: str, bits: int, m: str) -> list[tuple[str, str]]:
    """[(stage kind, (m, n) 4-bit codes q)] from the packed (m, n/8 * bits) indices."""
    groups = b.op("Reshape", codes, b.op("Concat", m, b.ints([-1, bits]), axis=0))       # (m, G, bits)
    split = {"num_outputs": bits} if b.opset >= 18 else {}      # equal parts: implied before opset 18
    cols = b.op("Split", groups, axis=2, outputs=bits, **split)
    one_bit = xor_tables()[2] if b.opset >= BITWISE_OPSET else arithmetic_tables()[3]
    out, at = [], 0
    for kind in STAGES[bits]:
        if kind == "e8p":
            q = _e8p_codes(b, cols[at], cols[at + 1])
        else:
            q = _gather(b, _table(b, "t1" if b.opset >= BITWISE_OPSET else "t1_int64", one_bit), cols[at])
        out.append((kind, b.op("Reshape", q, b.op("Concat", m, b.ints([-1]), axis=0))))
        at += BYTES[kind]
    return out


def _stages_and_scales(b: Builder, bits: int, w: dict, m: str) -> tuple[list, list]:
    scale_f = b.op("Cast", w["scale"], to=FLOAT)
    stages = stage_codes(b, w["codes"], bits, m)
    return stages, [b.op("Gather", scale_f, b.const(np.int64(s)), axis=1) for s in range(len(stages))]   # (m,)


def dequantize(b: Builder, bits: int, w: dict, m: str, lit: dict) -> str:
    """W' (m, n) float32: sum over stages of scale[:, s] * (0.5 q_s - 4 + offset)."""
    wt = None
    for (kind, q), s in zip(*_stages_and_scales(b, bits, w, m)):
        val = b.op("Sub", b.op("Mul", b.op("Cast", q, to=FLOAT), b.const(np.float32(0.5))),
                   b.const(np.float32(4 - OFFSET[kind])))
        part = b.op("Mul", val, b.op("Unsqueeze", s, b.ints([1])))
        wt = part if wt is None else b.op("Add", wt, part)
    return wt


def weight_product(b: Builder, v, z: str, w: dict, m: str, lit: dict) -> str:
    """W' z for the m rows of codes / scale (m, stages)."""
    if v.mode == "unpack":
        return b.op("MatMul", z, b.op("Transpose", dequantize(b, v.bits, w, m, lit), perm=[1, 0]))
    stages, scales = _stages_and_scales(b, v.bits, w, m)
    y, corr = None, None
    for (kind, q), s in zip(stages, scales):
        half = b.op("Mul", s, b.const(np.float32(0.5)))
        part = matmul_nbits(b, z, blocks(b, nibbles(b, q, m), m, lit, 4), half, m, 4, lit)
        y = part if y is None else b.op("Add", y, part)
        if OFFSET[kind]:
            off = b.op("Mul", s, b.const(np.float32(OFFSET[kind])))
            corr = off if corr is None else b.op("Add", corr, off)
    return b.op("Add", y, times_row_sums(b, z, corr))


E8P = register_lowering(Lowering("e8p", ("codes", "scale"), plan, weight_product, dequantize,
                                 ms_modes=("repack4",)))
