"""Code formats (quipc_runtime.formats): codebooks, index layout, decoding, bpw, registry."""
import dataclasses

import numpy as np
import pytest
import torch

from quipc_runtime.formats import FORMATS, get_format, require_format
from quipc_runtime.formats.e8p import STAGES, join_indices, split_indices
from quipc_runtime.formats.lattice import e8_one_bit_table, e8p_source_parity, e8p_sources, e8p_table
from quipc_runtime.layer import QuantizedLinear
from quipc.passes.encoders.e8p_search import E8PSearch, TableSearch
from e8p_layers import random_e8p_layer


def test_e8p_points_are_distinct_points_of_the_shifted_lattice():
    table = e8p_table().astype(np.float64)
    assert table.shape == (1 << 16, 8) and len(np.unique(table, axis=0)) == 1 << 16
    shift = np.where(np.arange(1 << 16) >> 15, -0.25, 0.25)[:, None]
    coset = table - shift                       # must lie in D8hat: half-integers, even sum
    assert np.all(np.abs(coset * 2 - np.rint(coset * 2)) < 1e-6)
    assert np.all(np.rint(coset * 2) % 2 == 1)
    assert np.all(np.rint(coset.sum(1)) % 2 == 0)


def test_e8p_sources_are_the_256_smallest_patterns_padded():
    src = e8p_sources().astype(np.float64)
    norms = (src ** 2).sum(1)
    assert len(np.unique(src, axis=0)) == 256
    assert (norms <= 10).sum() == 227 and np.all(norms[227:] == 12)
    assert np.array_equal(e8p_source_parity(), np.rint(src.sum(1)).astype(int) % 2)


def test_every_e8p_index_round_trips_through_the_search():
    table = torch.from_numpy(e8p_table())
    index, point = E8PSearch(torch.float64).nearest(table.double())
    assert torch.equal(index, torch.arange(1 << 16))
    assert torch.equal(point.float(), table)


def test_every_one_bit_index_round_trips():
    table = e8_one_bit_table()
    assert len(np.unique(table, axis=0)) == 256
    norms = (table ** 2).sum(1)
    assert np.all(norms[:240] == 2) and np.all(norms[240:] == 4)
    index, _ = TableSearch(table, torch.float64).nearest(torch.from_numpy(table).double())
    assert torch.equal(index, torch.arange(256))


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.5])
def test_e8p_search_equals_brute_force(scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(2000, 8, generator=gen, dtype=torch.float64) * scale
    table = torch.from_numpy(e8p_table()).double()
    dist = (x ** 2).sum(1, keepdim=True) - 2 * x @ table.t() + (table ** 2).sum(1)
    index, point = E8PSearch(torch.float64).nearest(x)
    rows = torch.arange(len(x))
    assert torch.allclose(dist[rows, index], dist.min(1).values, atol=1e-9)
    assert torch.equal(point, table[index])


def test_one_bit_search_equals_brute_force():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    table = torch.from_numpy(e8_one_bit_table()).double()
    index, _ = TableSearch(e8_one_bit_table(), torch.float64).nearest(x)
    assert torch.equal(index, torch.cdist(x, table).argmin(1))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_index_layout_round_trips(bits):
    rng = np.random.default_rng(bits)
    idx = [rng.integers(0, 1 << (8 * (1 if k == "e8_1bit" else 2)), size=(5, 6)) for k in STAGES[bits]]
    codes = join_indices(idx, bits)
    assert codes.shape == (5, 6 * bits) and codes.dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(split_indices(codes, bits), idx))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8p_decode_and_exact_bpw(bits):
    layer = random_e8p_layer(16, 32, bits, bias=False)
    layer.validate()
    w = layer.rotated_weight()
    idx = split_indices(layer.codes, bits)
    scale = layer.scale.astype(np.float32)
    row, group = 3, 2
    expect = scale[row, 0] * e8p_table()[idx[0][row, group]]
    if bits > 2:
        second = e8p_table() if bits == 4 else e8_one_bit_table()
        expect = expect + scale[row, 1] * second[idx[1][row, group]]
    assert np.allclose(w[row, 8 * group:8 * group + 8], expect)
    m, n, stages = 16, 32, len(STAGES[bits])
    # codes + fp16 stage scales + fp16 in_scale + output sign bits (Hadamard: no seeds)
    expected_bits = m * n * bits + 16 * m * stages + 16 * n + 8 * ((m + 7) // 8)
    assert layer.storage_bits() == expected_bits


def test_registry_and_refusals():
    assert {"grid", "e8p"} <= set(FORMATS)
    with pytest.raises(ValueError, match="unknown code format 'nope'"):
        get_format("nope")
    with pytest.raises(ValueError, match="multiple of 8"):
        get_format("e8p").check(2, 20)
    layer = random_e8p_layer(16, 32, 2, bias=False)
    from quipc.backends.tvm.lowering import LOWERINGS  # the TVM backend's formats (no tvm import)

    assert {"grid", "e8p"} <= set(LOWERINGS)
    require_format(layer, tuple(LOWERINGS), "the TVM backend")
    with pytest.raises(ValueError, match="TVM backend runs the code format.*'made-up'"):
        require_format(dataclasses.replace(layer, format="made-up"), tuple(LOWERINGS), "the TVM backend")
    layer.zero = np.zeros(16, np.float16)
    with pytest.raises(ValueError, match="has no zero points"):
        layer.validate()


def test_layer_without_format_field_is_grid_and_tampered_format_is_refused():
    layer = random_e8p_layer(16, 32, 2, bias=False)
    meta, tensors = layer.meta(), layer.tensors()
    assert meta["format"] == "e8p"
    assert QuantizedLinear.from_storage(meta, tensors).format == "e8p"
    with pytest.raises(ValueError, match="unknown code format"):
        QuantizedLinear.from_storage({**meta, "format": "e9p"}, tensors)
    with pytest.raises(ValueError, match="scale has shape"):
        QuantizedLinear.from_storage({**meta, "format": "grid"}, tensors)
    old = {k: v for k, v in meta.items() if k != "format"}       # written before formats existed
    grid_tensors = {**tensors, "codes": np.zeros((16, 32 // 8 * 2), np.uint8),
                    "scale": np.ones(16, np.float16), "zero": np.zeros(16, np.float16)}
    assert QuantizedLinear.from_storage(old, grid_tensors).format == "grid"


@pytest.mark.parametrize("fmt,bits", [("grid", 3), ("e8p", 2), ("e8p", 4), ("trellis", 2)])
def test_effective_weight_decoded_in_row_steps_is_the_whole_expression(fmt, bits):
    """QuantizedLinear.effective_weight decodes W' a row step at a time into its result: the
    floats of K_out^T W' K_in on the whole decoded W' (a last step shorter than the others)."""
    from quipc.config import QuantConfig
    from quipc.passes.methods import LayerInput, quantize_linear

    g = torch.Generator().manual_seed(bits)
    m, n = 304, 96
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    layer = quantize_linear(LayerInput("blk.0.proj", torch.randn(m, n, generator=g), hessian=x.t() @ x),
                            QuantConfig(bits=bits, format=fmt))
    w = layer.t_in.kron_right(layer.rotated_weight())
    layer.t_out.kron_right(w.T, out=w.T)
    w *= layer.t_out.sign_vector()[:, None] * layer.in_scale_f32()[None, :]
    for step in (256, 64):
        assert np.array_equal(layer.effective_weight(step=step), w)


@pytest.mark.parametrize("fmt,bits", [("grid", 3), ("e8p", 2), ("trellis", 2)])
def test_decode_rows_equals_the_decoded_matrix_rows(fmt, bits):
    """CodeFormat.decode_rows (an embedding lookup from a head's codes) gives the rows of the
    whole decode, for ids unsorted, repeated, several in one trellis row group, and all of them."""
    from quipc.config import QuantConfig
    from quipc.passes.methods import LayerInput, quantize_linear

    g = torch.Generator().manual_seed(bits)
    m, n = 64, 32
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    layer = quantize_linear(LayerInput("head", torch.randn(m, n, generator=g), hessian=x.t() @ x),
                            QuantConfig(bits=bits, format=fmt))
    f = get_format(fmt)
    tensors = {key: getattr(layer, key) for key in f.tensor_specs(m, n, bits)}
    whole = f.decode(tensors, bits, n)
    for ids in (np.array([63, 2, 17, 2, 0, 16, 31, 17]), np.arange(m), np.array([5])):
        assert np.array_equal(f.decode_rows(tensors, bits, n, ids), whole[ids])
