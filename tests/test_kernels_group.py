"""QuipLinearPlan.forward_group (cpp/quip_linear_group.cpp): plans that share their input side run
as one group (the input side once, the parts' GEMVs in one region, their output sides spread over
the threads) and give what each plan's own forward gives, bit for bit, in every format and path."""
import dataclasses

import numpy as np
import pytest

from quipc_runtime import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="quipc kernels extension not built")

from e8p_layers import random_e8p_layer  # noqa: E402
from test_kernels import make_layer  # noqa: E402
from trellis_layers import random_trellis_layer  # noqa: E402

N, OUTS = 192, (192, 64, 64)   # q / k / v-like parts: 16-row multiples, unequal


def shared(layers):
    """The layers with the first one's in_scale and input transform (tied q / k / v)."""
    head = layers[0]
    return [head] + [dataclasses.replace(la, t_in=head.t_in, in_scale=head.in_scale) for la in layers[1:]]


def parts(fmt, bits):
    if fmt == "grid":
        return shared([make_layer(m, N, bits, seed=i) for i, m in enumerate(OUTS)])
    if fmt == "e8p":
        return shared([random_e8p_layer(m, N, bits, seed=i) for i, m in enumerate(OUTS)])
    return shared([random_trellis_layer(m, N, bits, seed=i) for i, m in enumerate(OUTS)])


# (format, bits, prepare's options): every GEMV path the decode takes (fp32 and int8 activations,
# e8p's grid planes, trellis' int8 rows, row tiles on and off) and the formats' own kernels
CASES = [("grid", 2, {}), ("grid", 4, {"int8_activations": True}),
         ("grid", 4, {"int8_activations": True, "row_tiles": "on"}),
         ("e8p", 2, {}), ("e8p", 2, {"int8_activations": True, "row_tiles": "on"}),
         ("e8p", 2, {"e8p_as_grid4": False}),
         ("trellis", 4, {"trellis_as_int8": True, "int8_activations": True}),
         ("trellis", 4, {"trellis_as_int8": True, "int8_activations": True, "row_tiles": "on"}),
         ("trellis", 2, {})]


@pytest.mark.parametrize("fmt,bits,opts", CASES)
@pytest.mark.parametrize("batch", [1, 3, 6])   # 6: past the GEMV, each part's own matmul
@pytest.mark.parametrize("threads", [1, 2])
def test_group_equals_each_plans_forward(fmt, bits, opts, batch, threads):
    plans = [K.prepare(la, **opts) for la in parts(fmt, bits)]
    assert all(p.shares_input_side(plans[0]) for p in plans)
    x = np.random.default_rng(batch).standard_normal((batch, N)).astype(np.float32)
    ys = K._ext.forward_group(plans, x, threads=threads)
    assert [y.shape for y in ys] == [(batch, m) for m in OUTS]
    for p, y in zip(plans, ys):
        np.testing.assert_array_equal(y, p.forward(x, threads=threads))


@pytest.mark.parametrize("threads", [1, 2])
def test_output_sides_spread_over_the_threads(threads):
    """Parts whose output transforms are worth a thread each (1536 = 32 x 48 dense factors,
    ~125k multiply-adds a row): at 2 threads each part's output side runs on its own."""
    layers = shared([make_layer(1536, N, 4, seed=i, kout="kron") for i in range(2)])
    plans = [K.prepare(la, int8_activations=True) for la in layers]
    x = np.random.default_rng(7).standard_normal((1, N)).astype(np.float32)
    for p, y in zip(plans, K._ext.forward_group(plans, x, threads=threads)):
        np.testing.assert_array_equal(y, p.forward(x, threads=threads))


def test_one_plan_is_its_forward():
    plan = K.prepare(make_layer(64, 48, 3, seed=2))
    x = np.random.default_rng(2).standard_normal((2, 48)).astype(np.float32)
    (y,) = K._ext.forward_group([plan], x, threads=2)
    np.testing.assert_array_equal(y, plan.forward(x, threads=2))


def test_only_the_same_input_side_is_shared():
    q, k, _ = parts("grid", 2)
    own_scale = dataclasses.replace(k, in_scale=(k.in_scale * np.float16(2)).astype(np.float16))
    own_transform = make_layer(OUTS[1], N, 2, seed=1)    # its own t_in and in_scale
    pq = K.prepare(q)
    assert K.prepare(k).shares_input_side(pq)
    assert not K.prepare(own_scale).shares_input_side(pq)
    assert not K.prepare(own_transform).shares_input_side(pq)
    assert not K.prepare(make_layer(64, 96, 2, seed=3)).shares_input_side(pq)   # another n
    x = np.zeros((1, N), np.float32)
    with pytest.raises(ValueError, match="do not share their input side"):
        K._ext.forward_group([pq, K.prepare(own_scale)], x)
    with pytest.raises(ValueError, match="at least one plan"):
        K._ext.forward_group([], x)
