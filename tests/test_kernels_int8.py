"""The 4-bit GEMV on int8 activations (cpp/gemv_i8_avx2.cpp, kernels_scalar.cpp; LayerData::
int8_activations) against a numpy model of the same arithmetic and against the fp32 GEMV."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # the installed package (with its built extension), else the source tree
    import quipc_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from quipc_runtime import kernels as K  # noqa: E402
from quipc_runtime.packing import unpack  # noqa: E402
from e8p_layers import random_e8p_layer  # noqa: E402
from test_kernels import make_layer, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not K.available(), reason="quipc kernels extension not built")
BLOCK = 32


def quantize_blocks(z: np.ndarray, n: int) -> np.ndarray:
    """z (padded) -> what the kernel multiplies: round(z / d) * d per block of 32, d = max|z| / 127."""
    z = np.asarray(z, np.float32)[:, :n]
    blocks = -(-n // BLOCK)
    zp = np.zeros((z.shape[0], blocks * BLOCK), np.float32)
    zp[:, :n] = z
    zb = zp.reshape(z.shape[0], blocks, BLOCK)
    step = (np.abs(zb).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(step > 0, np.float32(1) / np.where(step > 0, step, 1), 0).astype(np.float32)
    q = np.rint(zb * inv)                       # round half to even, as the kernels
    assert np.abs(q).max() <= 127
    return (q * step).reshape(z.shape[0], -1)[:, :n]


def int8_reference(codes: np.ndarray, scale, zero, z, zsum, n):
    """t = scale * (codes . zq) + zero * sum(zq) in float64, zq the dequantized int8 z (the
    zero-point term on zq too, so that the codes' mean meets no rounding error)."""
    zq = quantize_blocks(z, n).astype(np.float64)
    return (zq @ codes[:, :n].astype(np.float64).T) * scale + np.outer(zq.sum(axis=1), zero)


# SmolLM2 shapes, n with a partial last block (200 = 6 * 32 + 8), one-row and odd-row tails
SHAPES = [(576, 576), (1536, 576), (576, 1536), (40, 200), (7, 8), (13, 72)]


@pytest.mark.parametrize("force_scalar", [False, True])
@pytest.mark.parametrize("m,n", SHAPES)
def test_grid4_int8_gemv_is_the_block_quantized_product(m, n, force_scalar):
    layer = make_layer(m, n, 4, seed=m + n)
    plan = K.prepare(layer, int8_activations=True)
    fp32 = K.prepare(layer)
    assert plan.gemv_int8 and not fp32.gemv_int8
    codes = unpack(layer.codes, 4, n).astype(np.int64)
    scale, zero = layer.scale.astype(np.float64), layer.zero.astype(np.float64)
    rng = np.random.default_rng(3)
    for batch in (1, 2, 3, 4):
        x = rng.standard_normal((batch, n)).astype(np.float32)
        z, zsum = plan.transform_in(x)
        ref = int8_reference(codes, scale, zero, z, zsum, n)
        t1 = plan.matmul(z, zsum, threads=1, force_scalar=force_scalar)
        t2 = plan.matmul(z, zsum, threads=2, force_scalar=force_scalar)
        assert rel_err(t1, ref) < 2e-6, (batch, rel_err(t1, ref))
        np.testing.assert_array_equal(t1, t2)   # the same order of sums whatever the split
        # against the fp32 GEMV: the int8 rounding is visible but small
        exact = fp32.matmul(z, zsum)
        assert 1e-7 < rel_err(t1, exact) < 2e-2, (batch, rel_err(t1, exact))


def test_avx2_and_scalar_agree():
    layer = make_layer(576, 1536, 4, seed=5)
    plan = K.prepare(layer, int8_activations=True)
    x = np.random.default_rng(4).standard_normal((4, 1536)).astype(np.float32)
    for batch in (1, 4):
        z, zsum = plan.transform_in(x[:batch])
        fast, slow = plan.matmul(z, zsum), plan.matmul(z, zsum, force_scalar=True)
        assert rel_err(fast, slow) < 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8p_layers_take_it_through_their_nibbles(bits):
    """An e8p layer's GEMV runs on each stage's grid4 codes, on int8 activations; without
    e8p_as_grid4 (the e8p kernels) the flag is ignored."""
    layer = random_e8p_layer(192, 576, bits, seed=bits)
    plan = K.prepare(layer, int8_activations=True)
    assert plan.gemv_as_grid4 and plan.gemv_int8
    x = np.random.default_rng(6).standard_normal((2, 576)).astype(np.float32)
    exact = K.quip_linear(K.prepare(layer), x)
    y = K.quip_linear(plan, x)
    assert 1e-7 < rel_err(y, exact) < 2e-2
    assert not K.prepare(layer, e8p_as_grid4=False, int8_activations=True).gemv_int8


@pytest.mark.parametrize("bits", [2, 3])
def test_narrow_grid_layers_keep_the_fp32_gemv(bits):
    layer = make_layer(64, 96, bits)
    plan = K.prepare(layer, int8_activations=True)
    assert not plan.gemv_int8
    x = np.random.default_rng(7).standard_normal((1, 96)).astype(np.float32)
    np.testing.assert_array_equal(K.quip_linear(plan, x), K.quip_linear(K.prepare(layer), x))


def test_prefill_batches_stay_fp32():
    """Batches past the GEMV's 4 rows take the fp32 GEMM whatever the flag."""
    layer = make_layer(192, 576, 4, seed=9)
    x = np.random.default_rng(8).standard_normal((9, 576)).astype(np.float32)
    np.testing.assert_array_equal(K.quip_linear(K.prepare(layer, int8_activations=True), x),
                                  K.quip_linear(K.prepare(layer), x))


def test_zero_and_tiny_blocks():
    """An all-zero block has step 0 and contributes nothing; no division by zero."""
    layer = make_layer(16, 96, 4, seed=11, kin="identity", in_scale=False)
    plan = K.prepare(layer, int8_activations=True)
    x = np.zeros((1, 96), np.float32)
    x[0, 40] = 1e-30
    x[0, 70] = 3.0
    z, zsum = plan.transform_in(x)
    ref = int8_reference(unpack(layer.codes, 4, 96).astype(np.int64), layer.scale.astype(np.float64),
                         layer.zero.astype(np.float64), z, zsum, 96)
    for force_scalar in (False, True):
        t = plan.matmul(z, zsum, force_scalar=force_scalar)
        assert np.all(np.isfinite(t)) and rel_err(t, ref) < 2e-6
