"""BlockLDLQ against first principles: the block LDL factorization, equality with LDLQ at
block size 1, the loss identity, and never worse than nearest rounding."""
import pytest
import torch

from quipc.passes.block_ldlq import block_ldl_upper, block_ldlq
from quipc.passes.encoders.e8p import StagedQuantizer, fit_scales
from quipc.passes.grid import fit_grid
from quipc.passes.ldlq import ldlq, proxy_loss
from test_ldlq import random_problem


@pytest.mark.parametrize("g", [1, 4, 8])
def test_block_ldl_factorization(g):
    _, h = random_problem(1, n=32)
    u, d = block_ldl_upper(h, g)
    n = h.shape[0]
    mask = torch.block_diag(*[torch.ones(g, g)] * (n // g)).bool()
    assert torch.all(u[mask] == 0) and torch.all(torch.tril(u)[~mask] == 0)   # block strictly upper
    a = torch.eye(n, dtype=h.dtype) + u
    assert torch.allclose(a @ torch.block_diag(*d) @ a.T, h, atol=1e-9, rtol=1e-9)


def test_block_size_one_is_ldlq():
    w, h = random_problem(2)
    grid = fit_grid(w, 3, "mse")
    w_hat = block_ldlq(w, h, 1, lambda k, x: grid.round(x[:, 0])[:, None], lazy=16)
    assert torch.allclose(w_hat, grid.values(ldlq(w, h, grid)), atol=1e-12)


def _e8p_round(w, h, bits):
    quant = StagedQuantizer(bits, fit_scales(w, bits), w.dtype)
    return block_ldlq(w, h, 8, lambda k, x: quant.round(x)), quant


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_loss_identity_sum_of_block_errors(bits):
    """tr(E H E^T) = sum_k tr(eta_k D_k eta_k^T), eta_k the rounding errors of the blocks."""
    w, h = random_problem(3, n=32)
    u, d = block_ldl_upper(h, 8)
    w_hat, _ = _e8p_round(w, h, bits)
    etas = []
    for k in range(0, 32, 8):   # recompute each block's rounding input from the definition
        x = w[:, k:k + 8] + (w[:, :k] - w_hat[:, :k]) @ u[:k, k:k + 8]
        etas.append(x - w_hat[:, k:k + 8])
    block_sum = sum(float(torch.sum((e @ d[j]) * e)) for j, e in enumerate(etas))
    assert proxy_loss(w, w_hat, h) == pytest.approx(block_sum, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_nearest_rounding(seed):
    w, h = random_problem(10 + seed, m=32, n=64)
    for bits in (2, 3, 4):
        w_hat, quant = _e8p_round(w, h, bits)
        nearest = torch.cat([quant.round(w[:, k:k + 8]) for k in range(0, 64, 8)], dim=1)
        assert proxy_loss(w, w_hat, h) <= proxy_loss(w, nearest, h)


def test_lazy_span_does_not_change_the_result():
    w, h = random_problem(4, n=48)
    a, _ = _e8p_round(w, h, 2)
    quant = StagedQuantizer(2, fit_scales(w, 2), w.dtype)
    b = block_ldlq(w, h, 8, lambda k, x: quant.round(x), lazy=8)
    assert torch.allclose(a, b, atol=1e-10)
