"""Format "e8p": E8-lattice vector codes, 8 weights per group, residual stages for 3/4 bits.

Per group of 8 weights of row i (`bits` bytes, little-endian):
  2 bits: u16 E8P index a             W' = scale[i, 0] * E8P[a]
  3 bits: u16 a, then u8 b            W' = scale[i, 0] * E8P[a] + scale[i, 1] * E8_1bit[b]
  4 bits: u16 a, then u16 b           W' = scale[i, 0] * E8P[a] + scale[i, 1] * E8P[b]
(codebooks in .lattice). scale is (m, stages) fp16; the row width must be a multiple of 8.
"""
from __future__ import annotations

import numpy as np

from ..packing import packed_row_bytes
from . import CodeFormat, register_format
from .lattice import GROUP, e8_one_bit_table, e8p_table

STAGES = {2: ("e8p",), 3: ("e8p", "e8_1bit"), 4: ("e8p", "e8p")}
STAGE_BYTES = {"e8p": 2, "e8_1bit": 1}


def stage_table(kind: str) -> np.ndarray:
    return e8p_table() if kind == "e8p" else e8_one_bit_table()


def _specs(m: int, n: int, bits: int) -> dict:
    return {"codes": ((m, packed_row_bytes(n, bits)), np.uint8),
            "scale": ((m, len(STAGES[bits])), np.float16)}


def split_indices(codes: np.ndarray, bits: int) -> list[np.ndarray]:
    """(m, n/8 * bits) uint8 -> one (m, n/8) integer index array per stage."""
    m = codes.shape[0]
    groups = codes.reshape(m, -1, bits)
    out, at = [], 0
    for kind in STAGES[bits]:
        width = STAGE_BYTES[kind]
        idx = groups[:, :, at].astype(np.uint32)
        if width == 2:
            idx |= groups[:, :, at + 1].astype(np.uint32) << 8
        out.append(idx)
        at += width
    return out


def join_indices(indices: list[np.ndarray], bits: int) -> np.ndarray:
    """Inverse of split_indices."""
    parts = []
    for kind, idx in zip(STAGES[bits], indices):
        idx = np.asarray(idx, dtype=np.uint32)
        parts.append((idx & 0xFF).astype(np.uint8))
        if STAGE_BYTES[kind] == 2:
            parts.append((idx >> 8).astype(np.uint8))
    stacked = np.stack(parts, axis=-1)           # (m, n/8, bits)
    return np.ascontiguousarray(stacked.reshape(stacked.shape[0], -1))


def _decode(tensors: dict, bits: int, n: int) -> np.ndarray:
    codes, scale = tensors["codes"], tensors["scale"].astype(np.float32)
    m = codes.shape[0]
    w = np.zeros((m, n // GROUP, GROUP), np.float32)
    for s, (kind, idx) in enumerate(zip(STAGES[bits], split_indices(codes, bits))):
        w += scale[:, s, None, None] * stage_table(kind)[idx]
    return w.reshape(m, n)


def _check_width(n: int, m: int | None = None) -> None:
    if n % GROUP:
        raise ValueError(f"format 'e8p' codes groups of {GROUP} weights; a row of {n} is not a "
                         f"multiple of {GROUP} (use --format grid for this model)")


E8P = register_format(CodeFormat(
    name="e8p", bits=tuple(STAGES), tensor_specs=_specs, decode=_decode, check_shape=_check_width,
    describe="E8-lattice vector codes (E8P, 16-bit index per 8 weights), residual stage for 3/4 bits, "
             "fp16 scale per row and stage"))
