"""Quantized embeddings (quipc_runtime.embedding): integer tables and rows decoded from a
tied lm_head's codes, on the reference and the kernels paths."""
import numpy as np
import pytest
import torch

from quipc.config import QuantConfig
from quipc.passes.head import quantize_shared_head
from quipc_runtime import kernels
from quipc_runtime.embedding import EmbeddingTable, QuantEmbedding, head_rows

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")


def coherent_table(rows=48, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g, dtype=torch.float64) * 0.1
    w[:, 3] *= 20  # an outlier column: what the input transform is for
    x = torch.randn(512, dim, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, dim, dtype=torch.float64)
    return w, x.T @ x / x.shape[0]


@pytest.mark.parametrize("bits,group,dim", [(8, None, 48), (4, 16, 48), (4, 7, 21)])
def test_table_gather_equals_dequantized_rows(bits, group, dim):
    w = np.random.default_rng(0).normal(size=(30, dim)).astype(np.float32)
    t = EmbeddingTable.quantize("emb", w, bits, group)
    full = t.dequantize()
    ids = np.array([[3, 0, 29], [3, 5, 5]])
    np.testing.assert_array_equal(t.gather(ids), full[ids])
    g = t.group
    step = t.scale.astype(np.float32).repeat(g, axis=1)
    assert np.all(np.abs(full - w) <= step / 2 + 1e-3)  # nearest rounding on each group's grid
    assert t.storage_bits() == 8 * (t.codes.nbytes + t.scale.nbytes + t.zero.nbytes)


def test_table_rejects_bad_input():
    w = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="table bits"):
        EmbeddingTable.quantize("emb", w, 3)
    with pytest.raises(ValueError, match="does not divide"):
        EmbeddingTable.quantize("emb", w, 4, 3)
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        EmbeddingTable.quantize("emb", w, 8)
    t = EmbeddingTable.quantize("emb", np.ones((4, 8), np.float32), 8)
    with pytest.raises(IndexError, match="out of range"):
        t.gather(np.array([4]))
    with pytest.raises(TypeError, match="integers"):
        t.gather(np.array([1.0]))
    t.scale = t.scale[:, :0]
    with pytest.raises(ValueError, match="scale has shape"):
        t.validate()


@pytest.mark.parametrize("fmt", ["grid", "e8p", "trellis"])
@pytest.mark.parametrize("bits", [2, 4])
def test_shared_head_rows_are_its_effective_weight(bits, fmt):
    w, h = coherent_table()
    layer = quantize_shared_head("lm_head", w, h, QuantConfig(bits=bits, format=fmt))
    assert layer.t_out.kind == "identity" and layer.t_in.kind == "hadamard" and layer.format == fmt
    eff = layer.effective_weight()  # small: the identity output transform is 48 x 48 here
    ids = np.array([0, 7, 7, 39, 15, 16, 47])   # trellis: both ends of a 16-row tile
    np.testing.assert_allclose(head_rows(layer, ids), eff[ids], rtol=1e-5, atol=1e-6)
    # incoherence + adaptive rounding: better than nearest rounding in the same format
    nearest = quantize_shared_head("lm_head", w, h, QuantConfig(method="rtn", bits=bits, format=fmt))
    assert layer.info["proxy_loss"] < nearest.info["proxy_loss"]
    if fmt == "grid":
        assert layer.info["proxy_loss"] < layer.info["proxy_loss_rtn"]


@pytest.mark.parametrize("method", ["rtn", "ldlq"])
def test_shared_head_other_methods(method):
    w, h = coherent_table()
    layer = quantize_shared_head("lm_head", w, h, QuantConfig(method=method, bits=3))
    assert layer.t_in.kind == "identity" and layer.in_scale is None
    np.testing.assert_allclose(head_rows(layer, np.arange(48)), layer.effective_weight(), rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("fmt", ["grid", "e8p", "trellis"])
def test_embedding_module_backends_agree(fmt):
    w, h = coherent_table()
    layer = quantize_shared_head("lm_head", w, h, QuantConfig(bits=3, format=fmt))
    ref, fast = QuantEmbedding(layer, "reference"), QuantEmbedding(layer, "kernels")
    ids = torch.tensor([[1, 2, 39], [0, 0, 5]])
    torch.testing.assert_close(fast(ids), ref(ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref(ids), torch.from_numpy(layer.effective_weight()).float()[ids],
                               rtol=1e-5, atol=1e-6)
    table = EmbeddingTable.quantize("emb", w.float().numpy(), 4, 16)
    for backend in ("reference", "kernels"):
        mod = QuantEmbedding(table, backend)
        torch.testing.assert_close(mod(ids), torch.from_numpy(table.dequantize())[ids])


def test_embedding_needs_identity_output_transform():
    from quipc.passes.methods import LayerInput, quantize_linear

    w, h = coherent_table()
    layer = quantize_linear(LayerInput("lm_head", w.float(), None, h), QuantConfig(bits=3))
    with pytest.raises(ValueError, match="identity"):
        QuantEmbedding(layer)
