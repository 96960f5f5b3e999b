"""LDLQ: adaptive rounding with linear feedback from the LDL decomposition of H.

For H = (I + U) D (I + U)^T with U strictly upper triangular, LDLQ rounds column k as
    W^_k = Q(W_k + (W - W^)_{:, <k} U_{<k, k}),
which makes the proxy loss tr((W^ - W) H (W^ - W)^T) = sum_k D_kk |eta_k|^2 (eta the
rounding errors). The same feedback is obtained from R, the upper Cholesky factor of
H^-1 = R^T R (R = D^-1/2 (I + U)^-1), which is how OPTQ/GPTQ write it; we run that
form, in column blocks, because it needs no triangular inverse and updates lazily.
"""
from __future__ import annotations

import torch

from .grid import RowGrid


def ldl_upper(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = (I + U) D (I + U)^T with U strictly upper triangular; returns (U, diag(D))."""
    rev = torch.arange(h.shape[0] - 1, -1, -1)
    # Reversing rows and columns turns the upper-unit factor into a lower one (standard LDL).
    chol = torch.linalg.cholesky(h[rev][:, rev])
    diag = torch.diagonal(chol)
    lower_unit = chol / diag[None, :]
    upper_unit = lower_unit[rev][:, rev]
    return upper_unit - torch.eye(h.shape[0], dtype=h.dtype), (diag ** 2)[rev]


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """R upper triangular with H^-1 = R^T R."""
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True)


def ldlq(w: torch.Tensor, h: torch.Tensor, grid: RowGrid, block: int = 128) -> torch.Tensor:
    """Codes (m, n) for w under LDLQ with the (damped, positive definite) Hessian h."""
    w = w.clone()
    m, n = w.shape
    r = inverse_cholesky_upper(h).to(w.dtype)
    codes = torch.zeros_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w_blk, r_blk = w[:, i1:i2], r[i1:i2, i1:i2]
        err_blk = torch.zeros_like(w_blk)
        for i in range(i2 - i1):
            col = w_blk[:, i]
            c = grid.codes(col)
            codes[:, i1 + i] = c
            err = (col - grid.values(c)) / r_blk[i, i]
            w_blk[:, i + 1:] -= err[:, None] * r_blk[i, i + 1:][None, :]
            err_blk[:, i] = err
        w[:, i2:] -= err_blk @ r[i1:i2, i2:]
    return codes


def greedy_refine(w: torch.Tensor, h: torch.Tensor, grid: RowGrid, codes: torch.Tensor,
                  passes: int) -> torch.Tensor:
    """Coordinate descent on tr(E H E^T): each column in turn is set to the nearest grid
    point of its exact minimizer with the other columns fixed. Never increases the loss."""
    codes = codes.clone()
    h = h.to(w.dtype)
    err = grid.values(codes) - w           # E = W^ - W
    g = err @ h                            # G = E H, kept current
    diag = torch.diagonal(h)
    for _ in range(passes):
        for k in range(w.shape[1]):
            # loss in column k: h_kk e^2 + 2 e (G_k - E_k h_kk)  ->  e* = E_k - G_k / h_kk
            target = w[:, k] + err[:, k] - g[:, k] / diag[k]
            c = grid.codes(target)
            new_err = grid.values(c) - w[:, k]
            delta = new_err - err[:, k]
            if torch.any(delta != 0):
                g += delta[:, None] * h[k][None, :]
                err[:, k] = new_err
                codes[:, k] = c
    return codes


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W^ - W) H (W^ - W)^T)."""
    e = (w_hat - w).to(h.dtype)
    return float(torch.sum((e @ h) * e))
