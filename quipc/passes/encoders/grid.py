"""Encoder for the "grid" format: per-row grid fit, then LDLQ (+ greedy passes) or nearest."""
from __future__ import annotations

import numpy as np
import torch

from quipc_runtime.packing import pack

from ..grid import fit_grid
from ..ldlq import greedy_refine, ldlq
from . import Encoded, register_encoder


@register_encoder("grid", row_separable=True)
def encode_grid(w: torch.Tensor, h: torch.Tensor | None, cfg) -> Encoded:
    if h is None:
        grid = fit_grid(w, cfg.bits, cfg.grid)
        codes = grid.codes(w)
    else:
        w = w.to(torch.float32)
        grid = fit_grid(w, cfg.bits, cfg.grid, torch.diagonal(h))
        codes = ldlq(w, h, grid)
        if cfg.greedy_passes:
            codes = greedy_refine(w, h, grid, codes, cfg.greedy_passes)
    return Encoded(codes=pack(codes.cpu().numpy().astype(np.uint8), cfg.bits),
                   scale=grid.scale.cpu().numpy().astype(np.float16),
                   zero=grid.zero.cpu().numpy().astype(np.float16), values=grid.values(codes))
