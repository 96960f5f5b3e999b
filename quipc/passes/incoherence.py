"""QuIP incoherence processing: diagonal rescaling, then random orthogonal U, V with
W' = U (W D) V^T and H' = V (D^-1 H D^-1) V^T, so that tr(E H E^T) is unchanged."""
from __future__ import annotations

import torch

from quipc_runtime.modules import kron_apply
from quipc_runtime.transforms import Transform


def _mats(t: Transform, dtype: torch.dtype, device) -> list[torch.Tensor]:
    return [torch.from_numpy(m).to(dtype=dtype, device=device) for m in t.matrices()]


def apply_rows(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """X T^T: the transform applied to every row of x (signs included)."""
    signs = torch.from_numpy(t.sign_vector()).to(x)
    return kron_apply(x * signs, _mats(t, x.dtype, x.device))


def apply_rows_transposed(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """X T: the inverse of apply_rows."""
    signs = torch.from_numpy(t.sign_vector()).to(x)
    return kron_apply(x, _mats(t, x.dtype, x.device), transpose=True) * signs


def rotate_weight(w: torch.Tensor, t_in: Transform, t_out: Transform) -> torch.Tensor:
    """U W V^T."""
    return apply_rows(apply_rows(w, t_in).t(), t_out).t()


def unrotate_weight(w: torch.Tensor, t_in: Transform, t_out: Transform) -> torch.Tensor:
    """U^T W V, the inverse of rotate_weight."""
    return apply_rows_transposed(apply_rows_transposed(w, t_in).t(), t_out).t()


def rotate_hessian(h: torch.Tensor, t_in: Transform) -> torch.Tensor:
    """V H V^T."""
    h = apply_rows(apply_rows(h, t_in).t(), t_in).t()
    return (h + h.t()) / 2


def rescale_vector(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """D minimizing tr(D^-1 H D^-1) * ||W D||_F^2 (QuIP's bound): d_i = (H_ii / |W_:i|^2)^(1/4)."""
    col = (w.to(torch.float64) ** 2).sum(dim=0)
    hd = torch.diagonal(h).to(torch.float64)
    col = col.clamp_min(1e-12 * float(col.mean().clamp_min(1e-30)))
    hd = hd.clamp_min(1e-12 * float(hd.mean().clamp_min(1e-30)))
    d = (hd / col) ** 0.25
    return d / d.median()


def mu_weight(w: torch.Tensor) -> float:
    """max |W_ij| sqrt(mn) / ||W||_F: 1 for a flat matrix, sqrt(mn) for a single spike."""
    w = w.to(torch.float64)
    norm = float(w.norm())
    return 0.0 if norm == 0 else float(w.abs().max()) * (w.numel() ** 0.5) / norm


def mu_of_eigenvectors(q: torch.Tensor) -> float:
    """max |Q_ij| sqrt(n) for an orthogonal matrix of eigenvectors Q (n x n)."""
    return float(q.abs().max()) * (q.shape[0] ** 0.5)


def mu_hessian(h: torch.Tensor) -> float:
    """The paper's incoherence of H: max |Q_ij| sqrt(n) over its eigenvectors Q."""
    return mu_of_eigenvectors(torch.linalg.eigh(h.to(torch.float64))[1])
