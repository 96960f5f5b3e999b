"""Dense bit packing of b-bit integer codes (b in 2, 3, 4).

Layout (shared by every backend): each row of n codes is padded to a multiple of
8 codes; each group of 8 codes is stored in b bytes, read as one little-endian
integer in which code j occupies bits [b*j, b*j + b). For b=2 this is "4 codes per
byte, lowest bits first", for b=4 "low nibble first", and for b=3 it keeps codes
dense (8 codes in 3 bytes) instead of widening them to 4 bits.
"""
from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 3, 4)
GROUP = 8  # codes per packed group; a group is exactly `bits` bytes


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}: quipc packs 2, 3 or 4 bits")


def padded_cols(n: int) -> int:
    return -(-n // GROUP) * GROUP


def packed_row_bytes(n: int, bits: int) -> int:
    check_bits(bits)
    return padded_cols(n) // GROUP * bits


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(m, n) integer codes in [0, 2**bits) -> (m, packed_row_bytes(n, bits)) uint8."""
    check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    m, n = codes.shape
    padded = np.zeros((m, padded_cols(n)), dtype=np.uint64)
    padded[:, :n] = codes
    groups = padded.reshape(m, -1, GROUP)
    shifts = np.arange(GROUP, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(groups << shifts, axis=-1)  # (m, n/8) uint64
    as_bytes = words.astype("<u8").view(np.uint8).reshape(m, -1, 8)
    return np.ascontiguousarray(as_bytes[:, :, :bits].reshape(m, -1))


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack: (m, packed_row_bytes) uint8 -> (m, n) uint8 codes."""
    check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError("packed codes must be a 2-D uint8 array")
    m = packed.shape[0]
    if packed.shape[1] != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed row has {packed.shape[1]} bytes, expected {packed_row_bytes(n, bits)} "
            f"for {n} columns at {bits} bits")
    groups = packed.reshape(m, -1, bits)
    wide = np.zeros(groups.shape[:2] + (8,), dtype=np.uint8)
    wide[:, :, :bits] = groups
    words = wide.reshape(m, -1).view("<u8")  # (m, n/8)
    shifts = np.arange(GROUP, dtype=np.uint64) * np.uint64(bits)
    codes = (words[:, :, None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.reshape(m, -1)[:, :n].astype(np.uint8)
