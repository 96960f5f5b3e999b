"""LDLQ against first principles: the LDL factorization, the paper's column-by-column
definition, and the proxy loss it minimizes."""
import pytest
import torch

from quipc.passes.grid import fit_grid
from quipc.passes.ldlq import greedy_refine, ldl_upper, ldlq, proxy_loss


def random_problem(seed, m=24, n=40, tokens=400):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    h = x.T @ x / tokens + 1e-2 * torch.eye(n, dtype=torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    return w, h


def paper_ldlq(w, h, grid):
    """W^_k = Q(W_k + (W - W^)_{:,<k} U_{<k,k}) straight from the paper's definition."""
    u, _ = ldl_upper(h)
    w_hat = torch.zeros_like(w)
    for k in range(w.shape[1]):
        w_hat[:, k] = grid.round(w[:, k] + (w[:, :k] - w_hat[:, :k]) @ u[:k, k])
    return w_hat


def test_ldl_factorization():
    _, h = random_problem(0)
    u, d = ldl_upper(h)
    assert torch.all(torch.tril(u) == 0)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    torch.testing.assert_close((eye + u) @ torch.diag(d) @ (eye + u).T, h)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_equals_paper_definition(bits):
    w, h = random_problem(bits)
    grid = fit_grid(w, bits, "minmax")
    ours = grid.values(ldlq(w, h, grid, block=16))  # block < n exercises the lazy updates
    ref = paper_ldlq(w, h, grid)
    assert (ours == ref).double().mean() > 0.999
    assert proxy_loss(w, ours, h) == pytest.approx(proxy_loss(w, ref, h), rel=1e-6)


def test_loss_is_sum_of_d_weighted_errors():
    """tr(E H E^T) = sum_k D_kk |eta_k|^2 for LDLQ without clamping (the paper's identity)."""
    w, h = random_problem(5)
    grid = fit_grid(w * 0.5, 4, "minmax")  # values stay inside the grid: no clamping
    grid.zero -= 10 * grid.scale
    grid.scale *= 1.0
    u, d = ldl_upper(h)
    w_hat = grid.values(ldlq(w * 0.5, h, grid))
    e = w_hat - w * 0.5
    eta = e @ (torch.eye(h.shape[0], dtype=h.dtype) + u)  # E (I + U) = eta
    assert proxy_loss(w * 0.5, w_hat, h) == pytest.approx(float((eta ** 2 @ d).sum()), rel=1e-8)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_beats_nearest_rounding(seed, bits):
    w, h = random_problem(seed * 7 + bits)
    grid = fit_grid(w, bits, "minmax")
    assert proxy_loss(w, grid.values(ldlq(w, h, grid)), h) <= proxy_loss(w, grid.round(w), h)


def test_greedy_never_increases_loss():
    w, h = random_problem(11)
    grid = fit_grid(w, 2, "mse")
    codes = ldlq(w, h, grid)
    before = proxy_loss(w, grid.values(codes), h)
    after = proxy_loss(w, grid.values(greedy_refine(w, h, grid, codes, passes=2)), h)
    assert after <= before + 1e-12


def test_grid_is_fp16_exact_and_mse_no_worse():
    w, _ = random_problem(3)
    for mode in ("minmax", "mse"):
        g = fit_grid(w, 2, mode)
        assert torch.equal(g.scale, g.scale.half().double()) and torch.equal(g.zero, g.zero.half().double())
    err = lambda g: float(((g.round(w) - w) ** 2).sum())
    assert err(fit_grid(w, 2, "mse")) <= err(fit_grid(w, 2, "minmax"))
