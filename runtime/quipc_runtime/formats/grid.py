"""Format "grid": a per-row asymmetric uniform grid, W'[i, j] = scale[i] * code[i, j] + zero[i].

Codes are b-bit integers packed densely (quipc_runtime.packing); scale and zero are fp16.
"""
from __future__ import annotations

import numpy as np

from ..packing import SUPPORTED_BITS, packed_row_bytes, unpack
from . import CodeFormat, register_format


def _specs(m: int, n: int, bits: int) -> dict:
    return {"codes": ((m, packed_row_bytes(n, bits)), np.uint8),
            "scale": ((m,), np.float16), "zero": ((m,), np.float16)}


def _decode(tensors: dict, bits: int, n: int) -> np.ndarray:
    codes = unpack(tensors["codes"], bits, n).astype(np.float32)
    return (codes * tensors["scale"].astype(np.float32)[:, None]
            + tensors["zero"].astype(np.float32)[:, None])


def _any_width(n: int, m: int | None = None) -> None:
    return None


GRID = register_format(CodeFormat(
    name="grid", bits=SUPPORTED_BITS, tensor_specs=_specs, decode=_decode, check_shape=_any_width,
    describe="per-row uniform grid, b-bit scalar codes, fp16 scale and offset per row"))
