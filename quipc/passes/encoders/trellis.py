"""Encoder for the trellis formats ("trellis", "trellis256": one layout, two codes): a per-row
scale, then BlockLDLQ (g = 16) over 16x16 tiles, each tile's 256 weights rounded as one sequence
by tail-biting Viterbi (trellis_viterbi) on the format's code table.

The rows of W' are near Gaussian after the incoherence transforms and the code table has
unit mean square, so a row's scale is its RMS times a constant of the bit width (ROW_SCALE,
the proxy-loss optimum on SmolLM2 layers; see the module's tests for the Gaussian MSE).
A column block of 16 holds m/16 tiles: the Viterbi runs over all of them at once.
"""
from __future__ import annotations

import numpy as np
import torch

from quipc_runtime.formats import get_format
from quipc_runtime.formats.trellis import FORMAT_NAMES, SEQ, STATE_BITS, TILE, code_table, states_to_codes

from ..block_ldlq import block_ldlq, block_ldlq_consuming
from . import Encoded, register_encoder
from .trellis_viterbi import encode_sequences

# per format and bit width; trellis256's optimum on Gaussian sequences sits 4.5 % above trellis' at
# 4 bits (1.15 against 1.10 times the RMS, benchmarks/trellis_code.py --mse) and with it at 2-3 bits
ROW_SCALE = {"trellis": {2: 1.05, 3: 1.05, 4: 1.05}, "trellis256": {2: 1.05, 3: 1.05, 4: 1.10}}
STATE_DTYPE = np.uint16 if STATE_BITS <= 16 else np.int32    # one state per weight until the codes are packed


def fit_scale(w: torch.Tensor, bits: int, fmt: str = "trellis") -> torch.Tensor:
    """(m, 1) fp16-representable row scales."""
    rms = w.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-8)
    return (rms * ROW_SCALE[fmt][bits]).clamp(6.1e-5, 65504).to(torch.float16).to(w.dtype)


def encode_trellis(fmt: str, w: torch.Tensor, h: torch.Tensor | None, cfg, consume: bool = False) -> Encoded:
    m, n = w.shape
    get_format(fmt).check(cfg.bits, n, m)
    w = w.to(torch.float32)
    scale = fit_scale(w, cfg.bits, fmt)
    table = code_table(fmt)
    states = np.empty((m // TILE, n // TILE, SEQ), STATE_DTYPE)

    def quantize(k: int, x: torch.Tensor) -> torch.Tensor:
        seqs = (x / scale).reshape(m // TILE, SEQ)       # tile rows, row-major within the tile
        states[:, k] = encode_sequences(seqs.numpy(), table, cfg.bits)
        return torch.from_numpy(table[states[:, k]]).reshape(m, TILE) * scale

    loss = None
    if h is None:
        values = torch.cat([quantize(k, w[:, k * TILE:(k + 1) * TILE]) for k in range(n // TILE)], dim=1)
    elif consume:
        values, loss = block_ldlq_consuming(w, h, TILE, quantize)
    else:
        values = block_ldlq(w, h, TILE, quantize)
    return Encoded(codes=states_to_codes(states, cfg.bits), scale=scale.numpy().astype(np.float16),
                   zero=None, values=values, proxy_loss=loss)


for _fmt in FORMAT_NAMES:   # one encoder per trellis format, each on its own table and row scales
    register_encoder(_fmt, consumes_hessian=True)(
        lambda w, h, cfg, consume=False, _fmt=_fmt: encode_trellis(_fmt, w, h, cfg, consume))
