"""W' rounded per row to 8 bits: the copy of a trellis layer that decode GEMVs multiply by.

A trellis weight decodes through a 2^12-entry code table, one gather per weight; the kernels
instead round each row once, at load (C++: cpp/trellis_as_int8.cpp, read in one pass by
cpp/int8_rows_*.cpp) or build time (TVM: backends/tvm/trellis_as_int8.py, as two 4-bit grid
planes, int8_planes, that its grid GEMV kernels sum), to q = round(W'[i] / step[i]) with
step[i] = max_j |W'[i, j]| / 127, |q| <= 127. A weight moves by at most step / 2 (~1 % of the
4-bit trellis code's own error power on Gaussian rows). A "trellis256" layer is int8 by
construction, so its copy is exact (trellis_rows_as_int8). This module is the numpy definition
both are tested against.
"""
from __future__ import annotations

import numpy as np

# Which trellis layers' decode GEMVs the kernels runtime runs on this copy (quipc_runtime.load's
# trellis_as_int8, `quipc chat --trellis-as-int8`): none, the lm_head only, or all (the default
# since stop 51, as the custom-op library and TVM's default build: SmolLM2 w4, teacher-forced
# decode perplexity over 6 x 256 tokens 39.26 against 39.11 with the lm_head's only, 25.4 against
# 34.9 ms a token, `python benchmarks/decode_ppl.py ART@kernels ART@kernels-8bit-all`).
TRELLIS_AS_INT8 = ("none", "head", "all")


def trellis_copy_scope(value) -> str:
    """load()'s trellis_as_int8: True (= "head"), False (= "none") or one of TRELLIS_AS_INT8."""
    if value is True or value is False:
        return "head" if value else "none"
    if value not in TRELLIS_AS_INT8:
        raise ValueError(f"trellis_as_int8 must be True, False or one of {TRELLIS_AS_INT8}, not {value!r}")
    return value


def rows_as_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, n) W' -> (q (m, n) int16 in [-127, 127], step (m,) float32): W' ~ step[:, None] * q.
    Rounds half away from zero (C's lround), in float32 as the kernels do."""
    w = np.asarray(w, dtype=np.float32)
    peak = np.abs(w).max(axis=1)
    inv = np.divide(np.float32(127), peak, out=np.zeros_like(peak), where=peak > 0)
    v = w * inv[:, None]
    q = np.trunc(v + np.copysign(np.float32(0.5), v)).astype(np.int16)
    return q, (peak / np.float32(127)).astype(np.float32)


def trellis_rows_as_int8(layer) -> tuple[np.ndarray, np.ndarray]:
    """A trellis layer's (q, step) as the kernels build them: "trellis" rounds W' (rows_as_int8);
    "trellis256" is int8 already, exactly: q = A8[index of each state], step = scale / rms(A8)."""
    if layer.format != "trellis256":
        return rows_as_int8(layer.rotated_weight())
    from .formats import trellis as fmt

    states = fmt.codes_to_states(layer.codes, layer.bits, layer.in_features)
    q = fmt.tiles_to_matrix(fmt.row_code_int8()[fmt.xor256_index(states)]).astype(np.int16)
    step = (layer.scale.astype(np.float32)[:, 0] / np.float32(fmt.row_code_rms())).astype(np.float32)
    return q, step


def int8_planes(q: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Int8 rows (q, step) as two 4-bit grid planes: (hi, lo) (m, n) uint8 nibbles, scale (m, 2) =
    (16 step, step), zero (m,) = -128 step, so that step q = scale[:, :1] hi + scale[:, 1:] lo + zero."""
    u = (q + 128).astype(np.uint8)
    return u >> 4, u & 15, np.stack([16 * step, step], axis=1), -128 * step
