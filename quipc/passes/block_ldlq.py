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


def block_ldl_upper(h: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H = (I + U) D (I + U)^T with U block strictly upper (g x g blocks), D block diagonal.

    From the scalar LDL H = A D' A^T (A unit upper): A = A_b B with B the block diagonal
    of A, so A_b = A B^-1 and D = B D' B^T. Returns (U, D) with D as (n/g, g, g).
    Column block k of A_b needs only column block k of A, so A_b overwrites A in place:
    one n x n matrix in all (no identity matrices)."""
    n = h.shape[0]
    if n % g:
        raise ValueError(f"BlockLDLQ needs the width {n} to be a multiple of the block size {g}")
    a, d = ldl_unit_upper(h)
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
    m, n = w.shape
    u, _ = block_ldl_upper(h.to(torch.float64), g)
    u = u.to(w.dtype)
    lazy = max(g, lazy // g * g)
    acc = torch.zeros_like(w)
    w_hat = torch.empty_like(w)
    err = torch.empty_like(w)
    for s0 in range(0, n, lazy):
        s1 = min(s0 + lazy, n)
        for k in range(s0, s1, g):
            q = quantize(k // g, w[:, k:k + g] + acc[:, k:k + g])
            w_hat[:, k:k + g] = q
            err[:, k:k + g] = w[:, k:k + g] - q
            if k + g < s1:
                acc[:, k + g:s1] += err[:, k:k + g] @ u[k:k + g, k + g:s1]
        if s1 < n:
            acc[:, s1:] += err[:, s0:s1] @ u[s0:s1, s1:]
    return w_hat
