import numpy as np
import pytest
import torch

from quipc_runtime.hadamard import hadamard, split_order
from quipc_runtime.modules import kron_apply
from quipc_runtime.transforms import Transform, kron_orders


@pytest.mark.parametrize("order", [1, 2, 4, 12, 20, 28, 36, 44, 60, 64, 108])
def test_hadamard_matrices(order):
    h = hadamard(order).astype(np.int64)
    np.testing.assert_array_equal(h @ h.T, order * np.eye(order, dtype=np.int64))


def test_split_order():
    assert split_order(576) == (36, 16)
    assert split_order(1536) == (12, 128)
    assert split_order(4096) == (1, 4096)
    assert split_order(11008) is None  # 11008 = 2^8 * 43: no known order -> kron fallback


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
@pytest.mark.parametrize("n", [192, 576, 640, 1536, 13])
def test_orthogonal_and_invertible(kind, n):
    t = Transform.make(kind, n, seed=7)
    d = t.dense()
    np.testing.assert_allclose(d @ d.T, np.eye(n), atol=2e-6)
    x = torch.randn(3, n, dtype=torch.float64)
    mats = [torch.from_numpy(m).double() for m in t.matrices()]
    signs = torch.from_numpy(t.sign_vector()).double()
    y = kron_apply(x * signs, mats)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ d.T, atol=1e-5)
    back = kron_apply(y, mats, transpose=True) * signs
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-5)


def test_fallback_and_meta_round_trip():
    t = Transform.make("hadamard", 11008, seed=3)
    assert t.kind == "kron" and t.orders == kron_orders(11008) == (86, 128)
    h = Transform.make("hadamard", 576, seed=3)
    again = Transform.from_meta(h.meta(), h.sign_bits())
    np.testing.assert_array_equal(again.signs, h.signs)
    k = Transform.make("kron", 576, seed=3)
    np.testing.assert_array_equal(Transform.from_meta(k.meta()).matrices()[0], k.matrices()[0])
    assert not np.array_equal(Transform.make("kron", 576, seed=4).matrices()[0], k.matrices()[0])


def test_bad_meta():
    with pytest.raises(ValueError, match="multiply"):
        Transform.from_meta({"kind": "kron", "n": 10, "orders": [3, 3], "seed": 1})
    with pytest.raises(ValueError, match="unknown"):
        Transform.make("butterfly", 8, 0)


@pytest.mark.parametrize("kind,n", [("hadamard", 96), ("hadamard", 3 * 1024), ("kron", 200), ("kron", 13), ("identity", 10)])
def test_kron_right_is_the_dense_product(kind, n):
    t = Transform.make(kind, n, 3)
    x = np.random.default_rng(n).standard_normal((37, n)).astype(np.float32)
    got = t.kron_right(x, step=8)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, x.astype(np.float64) @ t.kron_product(), rtol=0, atol=1e-12)
    # in place, also through a transposed view (as effective_weight applies K_out)
    y = x.astype(np.float64)
    assert t.kron_right(y, step=8, out=y) is y and np.array_equal(y, got)
    z = np.ascontiguousarray(x.astype(np.float64).T).T
    t.kron_right(z, step=8, out=z)
    assert np.array_equal(z, got)


def test_effective_weight_is_the_dense_formula():
    """s_out * K_out^T W' K_in * in_scale, here with dense matrices."""
    from quipc.config import QuantConfig
    from quipc.passes.methods import LayerInput, quantize_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 96, generator=g)
    layer = quantize_linear(LayerInput("l", torch.randn(40, 96, generator=g), None, (x.t() @ x).double() / 400),
                            QuantConfig(method="quip", bits=2, format="e8p", rescale=True))
    k_in, k_out = layer.t_in.kron_product(), layer.t_out.kron_product()
    ref = (layer.t_out.sign_vector()[:, None] * (k_out.T @ layer.rotated_weight().astype(np.float64) @ k_in)
           * layer.in_scale_f32()[None, :])
    np.testing.assert_allclose(layer.effective_weight(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [4096, 3 * 1024, 512, 11008, 1536])
def test_large_power_of_two_factors_are_applied_as_sylvester_pairs(n):
    """applied_matrices: the same Kronecker product as matrices() (H_ab = H_a x H_b), a power-of-two
    factor above SYLVESTER_SPLIT in two; the compile's rotation (apply_rows) is the dense transform."""
    from quipc.passes.incoherence import apply_rows
    from quipc_runtime.transforms import SYLVESTER_SPLIT

    t = Transform.make("hadamard", n, 7)
    applied = t.applied_matrices()
    assert all(m.shape[0] <= max(SYLVESTER_SPLIT, 128) for m in applied)
    assert len(applied) == len(t.orders) + sum(o > SYLVESTER_SPLIT and o & (o - 1) == 0 for o in t.orders)
    prod = np.ones((1, 1))
    for m in applied:
        prod = np.kron(prod, m.astype(np.float64))
    assert np.array_equal(prod, t.kron_product())
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    dense = (x * torch.from_numpy(t.sign_vector()).double()) @ torch.from_numpy(t.kron_product()).t()
    torch.testing.assert_close(apply_rows(x, t), dense, rtol=1e-12, atol=1e-12)
