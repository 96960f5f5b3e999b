"""QuIP incoherence processing: diagonal rescaling, then random orthogonal U, V with
W' = U (W D) V^T and H' = V (D^-1 H D^-1) V^T, so that tr(E H E^T) is unchanged."""
from __future__ import annotations

import torch

from quipc_runtime.modules import kron_apply
from quipc_runtime.transforms import Transform


def _mats(t: Transform, dtype: torch.dtype, device) -> list[torch.Tensor]:
    return [torch.from_numpy(m).to(dtype=dtype, device=device) for m in t.applied_matrices()]


def apply_rows(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """X T^T: the transform applied to every row of x (signs included)."""
    signs = torch.from_numpy(t.sign_vector()).to(x)
    return kron_apply(x * signs, _mats(t, x.dtype, x.device))


def apply_rows_transposed(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """X T: the inverse of apply_rows."""
    signs = torch.from_numpy(t.sign_vector()).to(x)
    return kron_apply(x, _mats(t, x.dtype, x.device), transpose=True) * signs


# Rows (or columns) per step when a transform is applied to a matrix piecewise: each row
# goes through the same products as in one call on the whole matrix (the same floats), and a
# step's temporaries stay ~ CHUNK x n.
CHUNK = 256


def _two_sided(w: torch.Tensor, first, second, out: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """second(first(W)^T)^T for row-wise maps first, second (apply_rows or its inverse), in
    one output buffer, rows then columns in steps of CHUNK; laid out as the whole-matrix
    expression lays it out (a transposed view). out: that buffer (may be w itself), else a
    new one of `dtype` (w's by default)."""
    m, n = w.shape
    if out is None:
        out = torch.empty(n, m, dtype=dtype or w.dtype, device=w.device).t()
    for r0 in range(0, m, CHUNK):
        out[r0:r0 + CHUNK] = first(w[r0:r0 + CHUNK])
    for c0 in range(0, n, CHUNK):
        out[:, c0:c0 + CHUNK] = second(out[:, c0:c0 + CHUNK].t()).t()
    return out


def rotate_weight(w: torch.Tensor, t_in: Transform, t_out: Transform, out: torch.Tensor | None = None,
                  col_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """U (W diag(col_scale)) V^T (the floats of apply_rows(apply_rows(W D, V)^T, U)^T, in one new
    matrix, or in `out`, which may be w itself). dtype: W's rows are read CHUNK at a time in
    it (e.g. a float16 weight rotated in float64 without its float64 copy); w's by default."""
    dtype = dtype or w.dtype

    def first(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        return apply_rows(x if col_scale is None else x * col_scale[None, :], t_in)

    return _two_sided(w, first, lambda x: apply_rows(x, t_out), out, dtype)


def unrotate_weight(w: torch.Tensor, t_in: Transform, t_out: Transform, out: torch.Tensor | None = None) -> torch.Tensor:
    """U^T W V, the inverse of rotate_weight (in one new matrix, or in `out`, which may be w itself)."""
    return _two_sided(w, lambda x: apply_rows_transposed(x, t_in), lambda x: apply_rows_transposed(x, t_out), out)


def rotate_hessian(h: torch.Tensor, t_in: Transform, in_place: bool = False) -> torch.Tensor:
    """V H V^T, symmetrized: (K + K^T) / 2 for K = apply_rows(apply_rows(H)^T)^T.

    Built in one n x n buffer (in_place: H's own, H destroyed), rows then columns in steps
    of CHUNK, and symmetrized in place: the floats of the whole-matrix expression, without
    its ~5 n x n temporaries. Returned as the expression returned it (a transposed view;
    symmetric, so the same values)."""
    n = h.shape[0]
    out = h if in_place else torch.empty(n, n, dtype=h.dtype, device=h.device)
    out = _two_sided(h, lambda x: apply_rows(x, t_in), lambda x: apply_rows(x, t_in), out)
    # (K + K^T) / 2, block pair by block pair (both halves of a pair get the same sums)
    for i0 in range(0, n, CHUNK):
        for j0 in range(i0, n, CHUNK):
            blk = (out[i0:i0 + CHUNK, j0:j0 + CHUNK] + out[j0:j0 + CHUNK, i0:i0 + CHUNK].t()) / 2
            out[i0:i0 + CHUNK, j0:j0 + CHUNK] = blk
            out[j0:j0 + CHUNK, i0:i0 + CHUNK] = blk.t()
    return out.t()


def mu_rotated_eigenvectors(q: torch.Tensor, t: Transform) -> float:
    """mu_of_eigenvectors(apply_rows(q^T, t)^T) (the eigenvectors of V H V^T from those of H),
    a column block of q at a time."""
    top = 0.0
    for c0 in range(0, q.shape[1], CHUNK):
        top = max(top, float(apply_rows(q[:, c0:c0 + CHUNK].t(), t).abs().max()))
    return top * (q.shape[0] ** 0.5)


def rescale_vector(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """D minimizing tr(D^-1 H D^-1) * ||W D||_F^2 (QuIP's bound): d_i = (H_ii / |W_:i|^2)^(1/4)."""
    col = (w.to(torch.float64) ** 2).sum(dim=0)
    hd = torch.diagonal(h).to(torch.float64)
    col = col.clamp_min(1e-12 * float(col.mean().clamp_min(1e-30)))
    hd = hd.clamp_min(1e-12 * float(hd.mean().clamp_min(1e-30)))
    d = (hd / col) ** 0.25
    return d / d.median()


def mu_weight(w: torch.Tensor) -> float:
    """max |W_ij| sqrt(mn) / ||W||_F: 1 for a flat matrix, sqrt(mn) for a single spike.
    In float64, CHUNK rows of W (or of W^T, where that is the contiguous one) at a time: no
    float64 or contiguous copy of W, no |W| copy."""
    if not w.is_contiguous() and w.t().is_contiguous():
        w = w.t()          # the same entries
    squares, top = 0.0, 0.0
    for r0 in range(0, w.shape[0], CHUNK):
        part = w[r0:r0 + CHUNK]
        squares += float(part.to(torch.float64).pow(2).sum())
        lo, hi = part.aminmax()       # exact in any dtype
        top = max(top, -float(lo), float(hi))
    norm = squares ** 0.5
    return 0.0 if norm == 0 else top * (w.numel() ** 0.5) / norm


def mu_of_eigenvectors(q: torch.Tensor) -> float:
    """max |Q_ij| sqrt(n) for an orthogonal matrix of eigenvectors Q (n x n)."""
    return float(q.abs().max()) * (q.shape[0] ** 0.5)


def mu_hessian(h: torch.Tensor) -> float:
    """The paper's incoherence of H: max |Q_ij| sqrt(n) over its eigenvectors Q."""
    return mu_of_eigenvectors(torch.linalg.eigh(h.to(torch.float64))[1])
