"""Encoder for the "e8p" format: per-row stage scales, then BlockLDLQ (g = 8) over E8 codes.

Each row of W' (near Gaussian after the incoherence transforms) gets one fp16 scale per
stage: its RMS times the stage's constant in STAGE_SCALES. The constants minimize the
proxy loss of BlockLDLQ on SmolLM2-135M layers (block 3: q, o, up, down; the nearest-
rounding optimum for unit Gaussian vectors is 0.95 for the first stage, and BlockLDLQ
prefers larger steps); a per-row search of a multiplier gained under 1% on top.
"""
from __future__ import annotations

import numpy as np
import torch

from quipc_runtime.formats.e8p import STAGES, join_indices
from quipc_runtime.formats.lattice import GROUP

from ..block_ldlq import block_ldlq, block_ldlq_consuming
from . import Encoded, register_encoder
from .e8p_search import stage_search

# Stage scales relative to the row RMS (see the module docstring).
STAGE_SCALES = {2: (1.0,), 3: (1.045, 0.50), 4: (1.045, 0.30)}


class StagedQuantizer:
    """Greedy residual quantization of (m, 8) blocks with per-row stage scales."""

    def __init__(self, bits: int, scale: torch.Tensor, dtype, groups: int | None = None):
        self.kinds = STAGES[bits]
        self.searches = [stage_search(kind, dtype) for kind in self.kinds]
        self.scale = scale.to(dtype)                       # (m, stages)
        # kept indices: with `groups` known, one (m, groups) table per stage allocated up front
        # (thousands of small kept tensors would fragment the heap between the large temporaries
        # of BlockLDLQ, which then stays resident), else a dict per stage
        self.indices: list = ([torch.empty(scale.shape[0], groups, dtype=torch.int64) for _ in self.kinds]
                              if groups is not None else [{} for _ in self.kinds])

    def round(self, x: torch.Tensor, scale: torch.Tensor | None = None, keep: int | None = None) -> torch.Tensor:
        scale = self.scale if scale is None else scale
        value = torch.zeros_like(x)
        for s, search in enumerate(self.searches):
            col = scale[:, s:s + 1]
            index, point = search.nearest((x - value) / col)
            value = value + point.to(x.dtype) * col
            if keep is not None:
                if torch.is_tensor(self.indices[s]):
                    self.indices[s][:, keep] = index
                else:
                    self.indices[s][keep] = index
        return value

    def codes(self, bits: int, groups: int) -> np.ndarray:
        per_stage = [(d[:, :groups] if torch.is_tensor(d) else torch.stack([d[k] for k in range(groups)], dim=1))
                     .cpu().numpy() for d in self.indices]
        return join_indices(per_stage, bits)


def fit_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """(m, stages) fp16-representable scales for the rows of w."""
    rms = w.pow(2).mean(1).sqrt().clamp_min(1e-8)
    return _fp16(rms[:, None] * torch.tensor(STAGE_SCALES[bits], dtype=w.dtype)[None, :])


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(6.1e-5, 65504).to(torch.float16).to(t.dtype)


@register_encoder("e8p", consumes_hessian=True, row_separable=True)
def encode_e8p(w: torch.Tensor, h: torch.Tensor | None, cfg, consume: bool = False) -> Encoded:
    m, n = w.shape
    if n % GROUP:
        raise ValueError(f"format 'e8p' needs rows that are a multiple of {GROUP} wide, got {n}; "
                         "use --format grid")
    w = w.to(torch.float32)
    scale = fit_scales(w, cfg.bits)
    quant = StagedQuantizer(cfg.bits, scale, w.dtype, n // GROUP)
    loss = None
    if h is None:
        values = torch.cat([quant.round(w[:, k * GROUP:(k + 1) * GROUP], keep=k)
                            for k in range(n // GROUP)], dim=1)
    elif consume:
        values, loss = block_ldlq_consuming(w, h, GROUP, lambda k, x: quant.round(x, keep=k))
    else:
        values = block_ldlq(w, h, GROUP, lambda k, x: quant.round(x, keep=k))
    return Encoded(codes=quant.codes(cfg.bits, n // GROUP), scale=scale.cpu().numpy().astype(np.float16),
                   zero=None, values=values, proxy_loss=loss)
