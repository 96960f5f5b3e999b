"""The quantization pass on single layers: incoherence processing, losses, bpw, bad input."""
import numpy as np
import pytest
import torch

from quipc.config import QuantConfig
from quipc.passes.hessian import regularize
from quipc.passes.incoherence import (mu_hessian, mu_weight, rotate_hessian, rotate_weight,
                                      unrotate_weight)
from quipc.passes.methods import LayerInput, quantize_linear
from quipc_runtime.modules import QuipLinearRef
from quipc_runtime.transforms import Transform


def coherent_problem(m=64, n=96, seed=0):
    """Outlier input features and a few large weights: H and W aligned with the axes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, n, generator=g, dtype=torch.float64)
    x[:, :4] *= 25
    w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.02
    w[:, 2] *= 30
    return w, x.T @ x / 2000


def true_loss(layer, w, h):
    e = torch.from_numpy(layer.effective_weight()) - w
    return float(torch.sum((e @ h) * e)) / float(torch.sum((w @ h) * w))


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
def test_rotation_round_trip_and_loss_invariance(kind):
    w, h = coherent_problem()
    t_in, t_out = Transform.make(kind, 96, 1), Transform.make(kind, 64, 2)
    w_rot = rotate_weight(w, t_in, t_out)
    torch.testing.assert_close(unrotate_weight(w_rot, t_in, t_out), w)
    e = torch.randn_like(w)
    h_rot = rotate_hessian(h, t_in)
    e_rot = rotate_weight(e, t_in, t_out)
    assert float(torch.sum((e_rot @ h_rot) * e_rot)) == pytest.approx(float(torch.sum((e @ h) * e)), rel=1e-6)


def test_incoherence_lowers_mu():
    w, h = coherent_problem()
    t_in, t_out = Transform.make("hadamard", 96, 1), Transform.make("hadamard", 64, 2)
    assert mu_weight(rotate_weight(w, t_in, t_out)) < mu_weight(w) / 2
    assert mu_hessian(rotate_hessian(h, t_in)) < 0.6 * mu_hessian(h)


@pytest.mark.parametrize("method", ["rtn", "ldlq", "quip"])
def test_recorded_loss_matches_stored_layer(method):
    w, h = coherent_problem()
    layer = quantize_linear(LayerInput("l", w.float(), None, h), QuantConfig(method=method, bits=3))
    assert layer.info["proxy_loss"] == pytest.approx(true_loss(layer, w, h), rel=1e-4)
    x = torch.randn(5, 96)
    y = QuipLinearRef(layer)(x)
    np.testing.assert_allclose(y.numpy(), x.double().numpy() @ layer.effective_weight().T, atol=1e-4)


def test_quip_beats_ldlq_beats_rtn_on_coherent_problem():
    w, h = coherent_problem()
    loss = {m: true_loss(quantize_linear(LayerInput("l", w.float(), None, h), QuantConfig(method=m, bits=2)), w, h)
            for m in ("rtn", "ldlq", "quip")}
    assert loss["quip"] < loss["ldlq"] < loss["rtn"]


def test_bpw_arithmetic():
    w, h = coherent_problem()
    layer = quantize_linear(LayerInput("l", w.float(), None, h), QuantConfig(method="quip", bits=2))
    m, n = 64, 96
    # codes + fp16 scale/zero per row + fp16 in_scale per column + output sign bits
    assert layer.storage_bits() == m * n * 2 + 32 * m + 16 * n + 8 * (m // 8)
    layer = quantize_linear(LayerInput("l", w.float(), None, h), QuantConfig(method="quip", bits=3, incoherence="kron"))
    assert layer.storage_bits() == m * n * 3 + 32 * m + 16 * n + 2 * 64  # + two 8-byte seeds


def test_nan_weights_rejected():
    w, h = coherent_problem()
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_linear(LayerInput("blk.q", w.float(), None, h), QuantConfig())


@pytest.mark.parametrize("method", ["ldlq", "quip"])
def test_singular_and_zero_hessians_are_handled(method):
    w, h = coherent_problem()
    h[:10, :] = 0
    h[:, :10] = 0  # dead inputs
    low_rank = torch.randn(3, 96, dtype=torch.float64)
    for hess in (h, torch.zeros(96, 96, dtype=torch.float64), low_rank.T @ low_rank):
        layer = quantize_linear(LayerInput("l", w.float(), None, hess), QuantConfig(method=method, bits=2))
        assert np.isfinite(layer.effective_weight()).all()


def test_regularize_rejects_nan_hessian():
    with pytest.raises(ValueError, match="NaN"):
        regularize(torch.full((4, 4), float("nan")), 0.01, "blk.q")
