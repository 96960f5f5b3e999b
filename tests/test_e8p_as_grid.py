"""The 2-bit e8p layer as the 4-bit grid (quipc/backends/tvm/e8p_as_grid.py): the same weights."""
import numpy as np
import pytest
from e8p_layers import random_e8p_layer
from quipc_runtime.formats import get_format
from quipc_runtime.formats.lattice import e8p_table
from quipc_runtime.packing import unpack

from quipc.backends.tvm.e8p_as_grid import applies, as_grid4


def test_every_e8p_coordinate_is_a_4_bit_grid_step():
    q = e8p_table() * 2 + 7.5
    assert np.array_equal(q, np.round(q)) and q.min() >= 0 and q.max() <= 15


@pytest.mark.parametrize("shape", [(48, 64), (200, 576)])
def test_grid4_weights_equal_the_e8p_weights(shape):
    m, n = shape
    layer = random_e8p_layer(m, n, 2)
    grid = as_grid4(layer)
    assert (grid.format, grid.bits) == ("grid", 4) and (layer.format, layer.bits) == ("e8p", 2)
    w_e8p = get_format("e8p").decode({"codes": layer.codes, "scale": layer.scale}, 2, n)
    w_grid = unpack(grid.codes, 4, n).astype(np.float32) * grid.scale[:, None] + grid.zero[:, None]
    np.testing.assert_array_equal(w_grid, w_e8p)
    assert grid.t_in is layer.t_in and grid.t_out is layer.t_out


def test_other_layers_are_refused():
    layer = random_e8p_layer(16, 32, 4)
    assert not applies(layer)
    with pytest.raises(ValueError, match="only 2-bit e8p layers"):
        as_grid4(layer)


@pytest.mark.parametrize("shape,mode,rows", [((576, 576), "gemv", 1), ((576, 576), "gemm", 32),
                                             ((40, 72), "gemv", 3), ((40, 72), "gemm", 16)])
def test_grid4x2_kernel_matches_the_e8p_layer(shape, mode, rows):
    """A 4-bit e8p layer run as two 4-bit grid stages (tir_e8p4_grid) computes the e8p layer."""
    pytest.importorskip("tvm")
    import torch
    from quipc_runtime.modules import QuipLinearRef
    from test_tvm_e8p import run_kernel

    from quipc.backends.tvm.e8p_as_grid import as_grid4x2, kernel_layers

    layer = random_e8p_layer(*shape, 4, seed=4)
    x, y = run_kernel(as_grid4x2(layer), mode, rows)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())
    two, three = random_e8p_layer(16, 32, 2), random_e8p_layer(16, 32, 3)
    mapped = kernel_layers({"a": layer, "b": two, "c": three, "d": two}, keep=two)
    assert mapped["a"].format == "grid4x2" and mapped["b"] is two and mapped["c"] is three
