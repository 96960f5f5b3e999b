"""Per-row asymmetric uniform grids: W'[i, j] = scale[i] * code + zero[i], codes in [0, 2^b).

scale and zero are rounded to fp16 when the grid is fitted, so that rounding (LDLQ
included) works on exactly the values the artifact stores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Range shrink factors tried by the "mse" grid (1.0 = min-max).
SHRINKS = torch.linspace(1.0, 0.30, 29).tolist()


@dataclass
class RowGrid:
    scale: torch.Tensor  # (m,) fp16-representable values, in the working dtype
    zero: torch.Tensor   # (m,)
    bits: int

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest grid codes of w, shaped (m,) or (m, k) (rows aligned with the grid)."""
        scale, zero = (self.scale, self.zero) if w.dim() == 1 else (self.scale[:, None], self.zero[:, None])
        return torch.clamp(torch.round((w - zero) / scale), 0, self.maxq)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = (self.scale, self.zero) if codes.dim() == 1 else (self.scale[:, None], self.zero[:, None])
        return codes * scale + zero

    def round(self, w: torch.Tensor) -> torch.Tensor:
        return self.values(self.codes(w))

    def rows(self, r0: int, r1: int) -> "RowGrid":
        return RowGrid(self.scale[r0:r1], self.zero[r0:r1], self.bits)

    def round_error(self, w: torch.Tensor, step: int = 256, dtype: torch.dtype | None = None) -> torch.Tensor:
        """round(w) - w, `step` rows at a time (the same floats, temporaries ~ step x n), in
        `dtype` (w's by default; each step's rows converted where they are read)."""
        out = torch.empty(w.shape, dtype=dtype or w.dtype, device=w.device)
        for r0 in range(0, w.shape[0], step):
            rows = w[r0:r0 + step].to(out.dtype)
            out[r0:r0 + step] = self.rows(r0, r0 + step).round(rows).sub_(rows)
        return out


def _grid_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> RowGrid:
    maxq = (1 << bits) - 1
    dtype = lo.dtype
    # fp16 keeps ~3 decimal digits; a floor keeps constant rows from dividing by zero
    scale = ((hi - lo) / maxq).clamp_min(1e-6).to(torch.float16).to(dtype)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 6.1e-5))
    zero = lo.to(torch.float16).to(dtype)
    return RowGrid(scale, zero, bits)


def minmax_grid(w: torch.Tensor, bits: int, dtype: torch.dtype = torch.float64) -> RowGrid:
    """fit_grid(w.to(dtype), bits, "minmax") without w's copy in dtype (min and max are exact in any)."""
    lo, hi = w.aminmax(dim=1)
    return _grid_from_range(lo.to(dtype), hi.to(dtype), bits)


def fit_grid(w: torch.Tensor, bits: int, mode: str = "minmax",
             weights: torch.Tensor | None = None) -> RowGrid:
    """Fit one grid per row of w.

    minmax: the row's [min, max]. mse: the range shrunk toward zero by the factor that
    minimizes the (optionally diag(H)-weighted) squared rounding error of the row; at 2-3
    bits this trades rare clipped outliers for a much finer step.
    """
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    if mode == "minmax":
        return _grid_from_range(lo, hi, bits)
    if mode != "mse":
        raise ValueError(f"unknown grid mode {mode!r}; expected 'minmax' or 'mse'")
    weights = torch.ones(w.shape[1], dtype=w.dtype) if weights is None else weights.to(w.dtype)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for shrink in SHRINKS:
        grid = _grid_from_range(lo * shrink, hi * shrink, bits)
        err = ((grid.round(w) - w) ** 2 * weights[None, :]).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * shrink, best_lo)
        best_hi = torch.where(better, hi * shrink, best_hi)
    return _grid_from_range(best_lo, best_hi, bits)
