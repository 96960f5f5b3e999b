"""The "trellis256" code format (quipc_runtime.formats.trellis): the trellis layout with a code of
256 int8 values in interleaved rows, indexed by a state's low byte XOR a GF(2)-linear hash of its
top nibble. Its definition, its Gaussian error against "trellis", the encoder's round trip, and
every backend's decode of it: the C++ kernels (exact, and on int8 rows that are W' itself), the
ONNX function bodies and the custom-op library, TVM's 8-bit planes."""
from statistics import NormalDist

import numpy as np
import pytest
import torch

from quipc.config import QuantConfig
from quipc.passes.encoders import encode
from quipc_runtime import kernels
from quipc_runtime.formats import get_format
from quipc_runtime.formats.trellis import (HASH_COLUMNS, STATE_BITS, code_table, row_code_int8,
                                           row_code_rms, row_hash, xor256_index)
from quipc_runtime.int8_rows import trellis_rows_as_int8
from trellis_layers import random_trellis_layer

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")


def test_row_code_is_odd_interleaved_gaussian_rows():
    a8 = row_code_int8().astype(np.int64)
    normal = NormalDist()
    q = np.array([normal.inv_cdf((p + 0.5) / 256) for p in range(256)])
    q8 = np.round(q * 127 / q[-1]).astype(np.int64)
    assert a8.min() == -127 and a8.max() == 127
    assert np.array_equal(a8[np.arange(256) ^ 128], -a8)              # row r + 8 = -row r
    for r in range(8):                                                 # row r: every 16th quantile from r
        assert np.array_equal(a8[16 * r:16 * r + 16], q8[r::16])


def test_index_hash_is_linear_and_the_table_its_definition():
    x = np.arange(16)
    assert list(row_hash(1 << np.arange(4))) == list(HASH_COLUMNS)
    for a in range(16):   # h(a ^ b) = h(a) ^ h(b): GF(2)-linear, one affine instruction on a CPU with GFNI
        assert np.array_equal(row_hash(a ^ x), row_hash(a) ^ row_hash(x))
    assert len(set(row_hash(x).tolist())) == 16
    s = np.arange(1 << STATE_BITS)
    idx = xor256_index(s)
    assert np.array_equal(np.bincount(idx, minlength=256), np.full(256, 16))   # every value at 16 states
    table = code_table("trellis256")
    np.testing.assert_allclose(np.mean(table.astype(np.float64) ** 2), 1.0, rtol=1e-6)
    assert np.array_equal(table, (row_code_int8()[idx] / row_code_rms()).astype(np.float32))
    # from one state, the 16 next states (a new low nibble) read one whole row of A8
    for state in (0, 0x5A7, 0xFFF):
        nxt = ((state << 4) | x) & 0xFFF
        assert len(set((xor256_index(nxt) >> 4).tolist())) == 1
    with pytest.raises(ValueError, match="trellis code"):
        code_table("grid")


@needs_kernels
def test_cpp_code_tables_are_the_python_ones():
    for fmt in ("trellis", "trellis256"):
        assert np.array_equal(kernels._ext.trellis_code_table(fmt), code_table(fmt))
    with pytest.raises(ValueError, match="no trellis code table"):
        kernels._ext.trellis_code_table("e8p")


@pytest.mark.parametrize("k,gain", [(4, 0.95), (3, 0.98)])
def test_gaussian_mse_is_below_trellis(k, gain):
    """Why the format: on unit Gaussian rows its error is below "trellis"'s at the same bits
    (Gaussian sequences: -7 % at 4 bits, -5 % at 3; benchmarks/trellis_code.py --mse)."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32))
    mse = {f: float((encode(f, x, None, QuantConfig(bits=k, format=f)).values - x).pow(2).mean())
           for f in ("trellis", "trellis256")}
    assert mse["trellis256"] < gain * mse["trellis"], mse


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_decode_to_the_encoded_values(bits):
    w = torch.from_numpy(np.random.default_rng(bits).standard_normal((32, 48)).astype(np.float32))
    enc = encode("trellis256", w, None, QuantConfig(bits=bits, format="trellis256"))
    decoded = get_format("trellis256").decode({"codes": enc.codes, "scale": enc.scale}, bits, 48)
    assert np.array_equal(decoded, enc.values.numpy())
    assert not np.array_equal(decoded, get_format("trellis").decode({"codes": enc.codes, "scale": enc.scale}, bits, 48))


@pytest.mark.parametrize("bits", [2, 4])
def test_int8_rows_are_w_itself(bits):
    layer = random_trellis_layer(48, 80, bits, seed=bits, fmt="trellis256")
    q, step = trellis_rows_as_int8(layer)
    assert np.abs(q).max() <= 127
    w = layer.rotated_weight()
    np.testing.assert_allclose(q * step[:, None], w, rtol=1e-6, atol=1e-7 * np.abs(w).max())


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("force_scalar", [False, True])
def test_cpp_kernels_match_the_reference_decoder(bits, force_scalar):
    """The table GEMV / GEMM, and the GEMV on int8 rows, which for this format are W' exactly."""
    from quipc_runtime.modules import QuipLinearRef

    layer = random_trellis_layer(48, 80, bits, seed=bits, fmt="trellis256")
    exact = kernels.prepare(layer, trellis_as_int8=False)
    rows = kernels.prepare(layer, trellis_as_int8=True)
    assert rows.gemv_on_int8_rows and not exact.gemv_on_int8_rows
    for batch in (1, 3, 9):
        x = np.random.default_rng(batch).standard_normal((batch, 80)).astype(np.float32)
        want = QuipLinearRef(layer)(torch.from_numpy(x)).detach().numpy()
        for plan in (exact, rows):
            got = kernels.quip_linear(plan, x, threads=2, force_scalar=force_scalar)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_onnx_function_bodies_match_the_reference_decoder():
    pytest.importorskip("onnxruntime")
    from test_onnx_e8p import build, check, run

    layers = [random_trellis_layer(m, 64, 4, seed=i, name=f"l{i}", fmt="trellis256") for i, m in enumerate((96, 32))]
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    for ops, opset, group in (("quip", 21, False), ("std", 17, False)):
        check(layers, run(build(layers, ops, 3, group=group, opset=opset), x), x)


@needs_kernels
@pytest.mark.parametrize("bits", [3, 4])
def test_custom_op_library_matches_the_function_body(bits, tmp_path):
    pytest.importorskip("onnxruntime")
    from test_onnx_e8p import build
    from test_ort_custom_ops import BATCHES, assert_close, run_profiled

    layer = random_trellis_layer(96, 64, bits, seed=bits, fmt="trellis256")
    model = build([layer], accuracy_level=1)
    for b, s in BATCHES:
        x = np.random.default_rng(b).standard_normal((b, s, 64)).astype(np.float32)
        (want,), _ = run_profiled(model, False, {"x": x}, tmp_path)
        (got,), ops = run_profiled(model, True, {"x": x}, tmp_path)
        assert ops == {"QuipLinear"}
        assert_close(got, want)


def test_tvm_8_bit_planes_are_w_itself():
    from quipc.backends.tvm.trellis_as_int8 import as_int8x2

    layer = random_trellis_layer(32, 48, 4, seed=3, fmt="trellis256")
    planes = as_int8x2(layer)
    hi, lo = planes.codes.astype(np.float64)
    w = planes.scale[:, :1] * hi + planes.scale[:, 1:] * lo + planes.zero[:, None]
    np.testing.assert_allclose(w, layer.rotated_weight(), rtol=1e-5, atol=1e-6 * np.abs(w).max())


def test_mse_study_of_the_code_benchmark(monkeypatch):
    """benchmarks/trellis_code.py --mse: each code's error at 2-4 bits at its best scale, and its
    ratio to the "trellis" table's."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import trellis_code

    res = trellis_code.mse_study(sequences=16)
    assert set(res) == {"lut", "trellis256", "1mad"}
    for name, by_bits in res.items():
        assert by_bits[2]["mse"] > by_bits[3]["mse"] > by_bits[4]["mse"] > 0
        assert all(v["scale"] in trellis_code.MSE_SCALES for v in by_bits.values())
    assert all(res["lut"][k]["vs_lut"] == 1.0 for k in (2, 3, 4))
    assert res["trellis256"][4]["vs_lut"] < 1.0


@pytest.mark.parametrize("mode,rows", [("gemv", 1), ("gemm", 16)])
def test_tvm_code_kernels_match_the_reference_decoder(mode, rows):
    """`--tvm-trellis codes`: the trellis TIR computation with this format's table."""
    pytest.importorskip("tvm")
    from quipc_runtime.modules import QuipLinearRef
    from test_tvm_e8p import run_kernel

    layer = random_trellis_layer(64, 96, 4, seed=5, fmt="trellis256")
    x, y = run_kernel(layer, mode, rows)
    want = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
