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


STEP = 512  # rows / columns per step of the in-place reorderings below


def _anti_transpose_(s: torch.Tensor) -> torch.Tensor:
    """S[i, j] <- S[n-1-j, n-1-i] in place (a square, contiguous S), block pair by block pair."""
    n = s.shape[0]
    cuts = sorted({*range(0, n, STEP), *(n - c for c in range(0, n, STEP)), n})
    spans = list(zip(cuts[:-1], cuts[1:]))   # symmetric under x -> n - x, so partners are whole spans
    done = set()
    for i0, i1 in spans:
        for j0, j1 in spans:
            mate = ((n - j1, n - j0), (n - i1, n - i0))
            if ((i0, i1), (j0, j1)) in done:
                continue
            done.add(mate)
            blk = s[i0:i1, j0:j1]
            other = s[mate[0][0]:mate[0][1], mate[1][0]:mate[1][1]]
            keep = blk.clone()
            if mate == ((i0, i1), (j0, j1)):     # its own mate
                blk.copy_(keep.flip(0, 1).t())
            else:
                blk.copy_(other.flip(0, 1).t())
                other.copy_(keep.flip(0, 1).t())
    return s


def _flip_both_(s: torch.Tensor) -> torch.Tensor:
    """S[i, j] <- S[n-1-i, n-1-j] in place (a square, contiguous S), row pair by row pair."""
    n = s.shape[0]
    for i in range(n // 2):
        keep = s[i].flip(0)
        s[i] = s[n - 1 - i].flip(0)
        s[n - 1 - i] = keep
    if n % 2:
        s[n // 2] = s[n // 2].flip(0)
    return s


def ldl_unit_upper(h: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """H = A D A^T with A unit upper triangular; returns (A, diag(D)), A in a new n x n matrix
    (H is not changed; A is the only n x n matrix this allocates). overwrite: A is built in H's
    own memory instead (H, or its transpose, must be contiguous; H is destroyed), no n x n
    matrix is allocated, and A holds the same floats.

    Reversing rows and columns turns the upper-unit factor into a lower one (standard LDL):
    A = P L P for the unit lower Cholesky factor L of P H P (P the reversal). P H P is written
    transposed into the buffer so that it is Fortran-ordered, the Cholesky factorization runs
    in it in place, and the reversals are done in place."""
    n = h.shape[0]
    # buf[a, b] = (P H P)[b, a] = H[n-1-b, n-1-a]: its transpose (F-ordered) holds P H P
    if overwrite and h.is_contiguous():
        buf = _anti_transpose_(h)
    elif overwrite and h.t().is_contiguous():
        buf = _flip_both_(h.t())     # h = S^T: H[n-1-b, n-1-a] = S[n-1-a, n-1-b]
    elif overwrite:
        raise ValueError("ldl_unit_upper(overwrite=True) needs a contiguous H or H^T")
    else:
        buf = torch.empty(n, n, dtype=h.dtype, device=h.device)
        for a0 in range(0, n, STEP):
            a1 = min(a0 + STEP, n)
            buf[a0:a1] = h[:, n - a1:n - a0].t().flip(0, 1)
    chol = buf.t()
    torch.linalg.cholesky_ex(chol, check_errors=True, out=(chol, torch.empty((), dtype=torch.int32, device=h.device)))
    diag = torch.diagonal(chol).clone()
    chol.div_(diag[None, :])                         # unit lower L, in buf (transposed)
    # A[i, j] = L[n-1-i, n-1-j] = buf[n-1-j, n-1-i]: an anti-transpose of buf
    return _anti_transpose_(buf), (diag ** 2).flip(0)


def ldl_upper(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = (I + U) D (I + U)^T with U strictly upper triangular; returns (U, diag(D))."""
    a, d = ldl_unit_upper(h)
    a.diagonal().sub_(1)    # U = A - I (off the diagonal x - 0 == x, so no identity is needed)
    return a, d


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """R upper triangular with H^-1 = R^T R (the Cholesky factor of H freed before R is built)."""
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
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
    return error_loss(w_hat - w, h)


# rows of E per step of error_loss: its temporaries stay ~ LOSS_ROWS x n
LOSS_ROWS = 256


def error_loss(e: torch.Tensor, h: torch.Tensor) -> float:
    """tr(E H E^T), as sum((E H) * E) with the product taken in place, LOSS_ROWS rows of E
    at a time (summed in float64)."""
    total = 0.0
    for r0 in range(0, e.shape[0], LOSS_ROWS):
        part = e[r0:r0 + LOSS_ROWS].to(h.dtype)
        total += float(torch.sum((part @ h).mul_(part), dtype=torch.float64))
    return total
