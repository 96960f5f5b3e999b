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
