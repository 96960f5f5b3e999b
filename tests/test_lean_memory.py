"""The memory-lean Hessian paths (issue 14) give the floats of the plain whole-matrix expressions."""
from __future__ import annotations

import pytest
import torch

from quipc.config import QuantConfig
from quipc.passes import incoherence, ldlq, methods
from quipc.passes.block_ldlq import block_ldl_upper
from quipc.passes.hessian import regularize
from quipc.passes.incoherence import apply_rows, mu_of_eigenvectors, mu_rotated_eigenvectors, rotate_hessian
from quipc.passes.ldlq import ldl_upper
from quipc.passes.methods import LayerInput, quantize_linear
from quipc_runtime.transforms import Transform


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (the sign of zeros included)."""
    return a.shape == b.shape and torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    x *= 1 + 3 * torch.rand(n, generator=g, dtype=torch.float64)
    x[:, 3] = 0   # a dead input: exact zeros (and their signs) in the factors
    return regularize(x.t() @ x / (3 * n), 0.01)[0]


def _ldl_upper_dense(h):
    rev = torch.arange(h.shape[0] - 1, -1, -1)
    chol = torch.linalg.cholesky(h[rev][:, rev])
    diag = torch.diagonal(chol)
    upper_unit = (chol / diag[None, :])[rev][:, rev]
    return upper_unit - torch.eye(h.shape[0], dtype=h.dtype), (diag ** 2)[rev]


def _block_ldl_upper_dense(h, g):
    n = h.shape[0]
    u, d = _ldl_upper_dense(h)
    a = u + torch.eye(n, dtype=h.dtype)
    a_b = torch.empty_like(a)
    d_b = torch.empty(n // g, g, g, dtype=h.dtype)
    for j, idx in enumerate(torch.arange(n).reshape(-1, g)):
        b = a[idx][:, idx]
        a_b[:, idx] = torch.linalg.solve_triangular(b, a[:, idx], upper=True, left=False)
        d_b[j] = (b * d[idx][None, :]) @ b.t()
    return a_b - torch.eye(n, dtype=h.dtype), d_b


@pytest.mark.parametrize("n,kind,chunk", [(96, "hadamard", 7), (200, "kron", 64), (120, "hadamard", 512)])
def test_rotate_hessian_is_the_dense_expression(monkeypatch, n, kind, chunk):
    monkeypatch.setattr(incoherence, "CHUNK", chunk)
    h, t = _hessian(n), Transform.make(kind, n, 3)
    k = apply_rows(apply_rows(h, t).t(), t).t()
    ref = (k + k.t()) / 2
    got = rotate_hessian(h, t)
    assert _same(got, ref) and got.stride() == ref.stride()
    _, q = torch.linalg.eigh(h)
    assert mu_rotated_eigenvectors(q, t) == mu_of_eigenvectors(apply_rows(q.t(), t).t())


@pytest.mark.parametrize("n,step", [(97, 10), (96, 16), (40, 512)])
def test_ldl_in_place_is_the_dense_ldl(monkeypatch, n, step):
    monkeypatch.setattr(ldlq, "STEP", step)
    h = _hessian(n, seed=n)
    for got, ref in zip(ldl_upper(h), _ldl_upper_dense(h)):
        assert _same(got, ref)
    if n % 8 == 0:
        for g in (1, 4, 8):
            for got, ref in zip(block_ldl_upper(h, g), _block_ldl_upper_dense(h, g)):
                assert _same(got, ref)


def test_regularize_retries_on_the_undamped_diagonal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 24, generator=g, dtype=torch.float64)
    h = x.t() @ x / 40
    h -= 0.5 * h.diagonal().mean() * torch.eye(24, dtype=torch.float64)   # indefinite
    got, info = regularize(h, 0.001)
    assert info["damp"] > 0.001
    ref = h.clone()
    ref.diagonal().add_(info["damp"] * float(h.diagonal().clamp_min(0).mean()))
    assert _same(got, ref)


def test_mu_diagnostics_skipped_above_the_width_limit(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    cfg = QuantConfig(method="quip", bits=2, format="e8p")
    full = quantize_linear(LayerInput("l", w, None, (x.t() @ x).double() / 200), cfg)
    monkeypatch.setattr(methods, "MU_EIGH_MAX_N", 32)
    lean = quantize_linear(LayerInput("l", w, None, (x.t() @ x).double() / 200), cfg)
    assert (full.codes == lean.codes).all() and (full.scale == lean.scale).all()
    assert (full.in_scale == lean.in_scale).all()
    assert full.info["mu_h"] > 0 and "mu_h_skipped" not in full.info
    assert lean.info["mu_h"] is None and lean.info["mu_h_after"] is None and "64 x 64" in lean.info["mu_h_skipped"]


def _group_setup(g: torch.Generator):
    """A 32-wide Hessian, an empty group cache and a 2-bit grid QuIP config."""
    x = torch.randn(100, 32, generator=g)
    return (x.t() @ x).double() / 100, {}, QuantConfig(method="quip", bits=2, format="grid")


def test_group_keeps_only_the_rotated_hessian():
    g = torch.Generator().manual_seed(3)
    h, cache, cfg = _group_setup(g)
    for name in ("q", "k"):
        quantize_linear(LayerInput(name, torch.randn(8, 32, generator=g), None, h, cache), cfg)
        assert "h" not in cache and cache["h_rot"].shape == (32, 32)


def test_last_reader_frees_the_group():
    g = torch.Generator().manual_seed(4)
    h, cache, cfg = _group_setup(g)
    ws = [torch.randn(8, 32, generator=g) for _ in range(2)]
    other: dict = {}
    quantize_linear(LayerInput("q", ws[0], None, h, other), cfg)
    kept = quantize_linear(LayerInput("k", ws[1], None, h, other), cfg)
    assert "h_rot" in other
    quantize_linear(LayerInput("q", ws[0], None, h, cache), cfg)
    last = quantize_linear(LayerInput("k", ws[1], None, h, cache, last_reader=True), cfg)
    assert "h_rot" not in cache and "h" not in cache
    assert (last.codes == kept.codes).all() and last.info == kept.info


def test_staged_quantizer_index_table_matches_the_dict():
    from quipc.passes.encoders.e8p import StagedQuantizer, fit_scales

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    for bits in (2, 3, 4):
        a = StagedQuantizer(bits, fit_scales(w, bits), w.dtype)
        b = StagedQuantizer(bits, fit_scales(w, bits), w.dtype, groups=8)
        for k in range(8):
            assert torch.equal(a.round(w[:, 8 * k:8 * k + 8], keep=k), b.round(w[:, 8 * k:8 * k + 8], keep=k))
        assert (a.codes(bits, 8) == b.codes(bits, 8)).all()
