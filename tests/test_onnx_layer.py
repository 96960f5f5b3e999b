"""QuipLinear ONNX function vs the pure-torch reference, one layer at a time (fast).
Small transforms are dense MatMuls by default; KRON_ONLY keeps the Kronecker-factor path."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from quipc.backends.onnx.builder import Builder
from quipc.backends.onnx.emitter import QuipLinearEmitter
from quipc.config import QuantConfig
from quipc.passes.methods import LayerInput, quantize_linear
from quipc_runtime.modules import QuipLinearRef


def make_layer(m, n, bits, method="quip", incoherence="hadamard", bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    x = torch.randn(4 * n, n, generator=g) * torch.linspace(0.2, 3, n)
    h = (x.T.double() @ x.double()) / x.shape[0]
    b = torch.randn(m, generator=g) if bias else None
    cfg = QuantConfig(method=method, bits=bits, incoherence=incoherence)
    return quantize_linear(LayerInput("blk.0.proj", w, b, h), cfg)


KRON_ONLY = {"dense_layer_max": 0}


def run_layer(layer, x, ops, accuracy_level=0, rank=None, native_2bit=False, **kw):
    b = Builder()
    em = QuipLinearEmitter(b, ops=ops, accuracy_level=accuracy_level, native_2bit=native_2bit, **kw)
    y = em.emit("x", layer, out_name="y", rank=rank)
    graph = helper.make_graph(
        b.nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, layer.in_features])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, None, layer.out_features])],
        list(b.initializers.values()))
    model = helper.make_model(graph, opset_imports=em.opsets(), functions=list(em.functions.values()))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    if ops == "std":
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    else:
        assert [n.op_type for n in model.graph.node] == ["QuipLinear"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0], model


# 320 = 20 x 16 hadamard output: the shared dense matrix, then the signs as a Mul
CASES = [(96, 48, 2, "quip", "hadamard", False), (96, 48, 3, "quip", "hadamard", True),
         (320, 48, 4, "quip", "hadamard", False),
         (48, 96, 4, "quip", "kron", False), (40, 40, 4, "quip", "hadamard", True),
         (48, 64, 2, "rtn", "hadamard", False), (36, 72, 3, "quip", "kron", False)]


@pytest.mark.parametrize("m,n,bits,method,inc,bias", CASES)
@pytest.mark.parametrize("ops,rank,kw", [("quip", None, {}), ("quip", 3, {}), ("std", None, {}), ("std", 3, {}),
                                         ("quip", None, KRON_ONLY), ("quip", 3, KRON_ONLY), ("std", 3, KRON_ONLY)])
def test_layer_matches_reference(m, n, bits, method, inc, bias, ops, rank, kw):
    layer = make_layer(m, n, bits, method, inc, bias)
    x = np.random.default_rng(1).standard_normal((2, 5, n)).astype(np.float32)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).detach().numpy()
    for native in ([False, True] if bits == 2 and ops == "quip" else [False]):
        y, model = run_layer(layer, x, ops, rank=rank, native_2bit=native, **kw)
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_nbits_used_for_2_and_4_bits_and_3_bit_stays_dense():
    layer2 = make_layer(64, 48, 2)
    _, model = run_layer(layer2, np.zeros((1, 1, 48), np.float32), "quip")
    assert model.functions[0].overload.startswith("repack4")
    _, model = run_layer(layer2, np.zeros((1, 1, 48), np.float32), "quip", native_2bit=True)
    assert model.functions[0].overload.startswith("nbits_b2")
    layer4 = make_layer(64, 48, 4)
    _, model = run_layer(layer4, np.zeros((1, 1, 48), np.float32), "quip")
    body_ops = {n.op_type for f in model.functions for n in f.node}
    assert "MatMulNBits" in body_ops
    layer3 = make_layer(64, 48, 3)
    _, model = run_layer(layer3, np.zeros((1, 1, 48), np.float32), "quip")
    codes = [i for i in model.graph.initializer if i.name.endswith(".codes")][0]
    assert list(codes.dims) == [64, 48 // 8 * 3] and codes.data_type == TensorProto.UINT8
    assert model.functions[0].overload.startswith("repack4")   # widened only in memory, at load
    layer3 = make_layer(64, 40, 3)   # 40 columns: no MatMulNBits block size, standard ops
    _, model = run_layer(layer3, np.zeros((1, 1, 40), np.float32), "quip")
    assert "MatMulNBits" not in {n.op_type for f in model.functions for n in f.node}


def test_accuracy_level_4_close():
    layer = make_layer(96, 48, 4)
    x = np.random.default_rng(2).standard_normal((1, 7, 48)).astype(np.float32)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).detach().numpy()
    y, _ = run_layer(layer, x, "quip", accuracy_level=4)
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("kw,overload,shared", [
    ({}, "nbits_b4_k22_tdd_so_r3", ["quipc.hadamard.12", "quipc.hadamard.4", "quipc.hadamard.8"]),
    (KRON_ONLY, "nbits_b4_k22_so_r3", ["quipc.hadamard.12", "quipc.hadamard.4", "quipc.hadamard.8"])])
def test_transform_forms(kw, overload, shared):
    """48 = 12x4 in and 96 = 12x8 out (with signs): per-layer dense matrices (d) built in the
    body from the shared factors (folded at session creation), or the factors themselves (k)."""
    layer = make_layer(96, 48, 4)
    _, model = run_layer(layer, np.zeros((1, 1, 48), np.float32), "quip", rank=3, **kw)
    assert model.functions[0].overload == overload
    assert [i.name for i in model.graph.initializer if i.name.startswith("quipc.hadamard.")] == shared
