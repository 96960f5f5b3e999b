"""BlockLDLQ: LDLQ with vector blocks of g columns (QuIP#), for vector codebooks.

With the block LDL decomposition H = (I + U) D (I + U)^T, U block strictly upper
triangular (g x g blocks) and D block diagonal, block k of columns is rounded as
    W^_k = Q(W_k + (W - W^)_{:, <k} U_{<k, k}),
the same feedback as LDLQ, so that the proxy loss tr((W^ - W) H (W^ - W)^T) equals
sum_k tr(eta_k D_k eta_k^T) for the rounding errors eta_k of the blocks. g = 1 is LDLQ.
"""
from __future__ import annotations

from typing import Callable

import torch

from .ldlq import ldl_unit_upper


def block_ldl_upper(h: torch.Tensor, g: int, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """H = (I + U) D (I + U)^T with U block strictly upper (g x g blocks), D block diagonal.

    From the scalar LDL H = A D' A^T (A unit upper): A = A_b B with B the block diagonal
    of A, so A_b = A B^-1 and D = B D' B^T. Returns (U, D) with D as (n/g, g, g).
    Column block k of A_b needs only column block k of A, so A_b overwrites A in place:
    one n x n matrix in all (no identity matrices); overwrite: H's own memory (ldl_unit_upper)."""
    n = h.shape[0]
    if n % g:
        raise ValueError(f"BlockLDLQ needs the width {n} to be a multiple of the block size {g}")
    a, d = ldl_unit_upper(h, overwrite)
    # A as (A - I) + I would give it (x - 0 + 0 turns -0 into +0 off the diagonal)
    a.diagonal().sub_(1)
    a.add_(0.0)
    a.diagonal().add_(1)
    d_b = torch.empty(n // g, g, g, dtype=h.dtype)
    for j, k in enumerate(range(0, n, g)):
        b = a[k:k + g, k:k + g].clone()
        a[:, k:k + g] = torch.linalg.solve_triangular(b, a[:, k:k + g].contiguous(), upper=True, left=False)
        d_b[j] = (b * d[k:k + g][None, :]) @ b.t()
    a.diagonal().sub_(1)    # A_b - I (off the diagonal x - 0 == x)
    return a, d_b


def block_ldlq(w: torch.Tensor, h: torch.Tensor, g: int,
               quantize: Callable[[int, torch.Tensor], torch.Tensor], lazy: int = 128) -> torch.Tensor:
    """Round w (m, n) block by block; quantize(k, x) gets the feedback-adjusted columns
    k*g .. k*g+g-1 as (m, g) and returns their rounded values (and keeps the codes).
    Returns W^ (m, n). Feedback is applied eagerly within spans of `lazy` columns and
    in one product across spans (the same sums, in another order)."""
    u, _ = block_ldl_upper(h.to(torch.float64), g)
    return _round(w, u, None, g, quantize, lazy)[0]


def block_ldlq_consuming(w: torch.Tensor, h: torch.Tensor, g: int,
                         quantize: Callable[[int, torch.Tensor], torch.Tensor],
                         lazy: int = 128) -> tuple[torch.Tensor, float]:
    """block_ldlq (the same W^) with the factor built in H's own memory: h (float64, H or H^T
    contiguous) is destroyed, and no n x n matrix is allocated. Also returns the proxy loss
    tr((W^ - W) H (W^ - W)^T), which H no longer gives, as sum_k tr(eta_k D_k eta_k^T)."""
    if h.dtype != torch.float64:
        raise ValueError(f"block_ldlq_consuming factors H in its own float64 memory, got {h.dtype}")
    u, d_b = block_ldl_upper(h, g, overwrite=True)
    return _round(w, u, d_b, g, quantize, lazy)


def _round(w: torch.Tensor, u: torch.Tensor, d_b: torch.Tensor | None, g: int, quantize, lazy: int):
    """The BlockLDLQ loop over the float64 factor U, each span of its rows cast to w's dtype
    where it is used (the floats of casting U whole, without its copy). With d_b, also the
    loss sum_k tr(eta_k D_k eta_k^T) of the rounding errors eta_k (float64).

    One (m, n) buffer besides w: column j holds the feedback gathered for it until it is
    rounded, then its rounded value (the returned W^); the errors W - W^ are kept for the
    current span only (the feedback to later spans is one product per span)."""
    m, n = w.shape
    lazy = max(g, lazy // g * g)
    out = torch.zeros_like(w)
    loss = 0.0
    for s0 in range(0, n, lazy):
        s1 = min(s0 + lazy, n)
        u_span = u[s0:s1, s0:].to(w.dtype)          # rows s0..s1 of U from column s0 on
        err = torch.empty(m, s1 - s0, dtype=w.dtype, device=w.device)
        for k in range(s0, s1, g):
            x = w[:, k:k + g] + out[:, k:k + g]
            q = quantize(k // g, x)
            out[:, k:k + g] = q
            e = err[:, k - s0:k - s0 + g]
            e.copy_(w[:, k:k + g] - q)
            if d_b is not None:
                eta = (x - q).to(torch.float64)
                loss += float(((eta @ d_b[k // g]) * eta).sum())
            if k + g < s1:
                out[:, k + g:s1] += e @ u_span[k - s0:k - s0 + g, k + g - s0:s1 - s0]
        if s1 < n:     # into the buffer itself (no (m, n - s1) product beside it)
            out[:, s1:].addmm_(err, u_span[:, s1 - s0:])
        del u_span, err
    return out, loss
