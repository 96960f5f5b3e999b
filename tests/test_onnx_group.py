"""QuipLinearGroup and the dense transform forms vs the torch reference, layer by layer (fast):
grouped q/k/v-like layers, fallbacks, read-back (layers_from_onnx), and the node count that
onnxruntime runs after its optimizations."""
import dataclasses
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from quipc.backends.onnx.builder import Builder
from quipc.backends.onnx.inspect import layers_from_onnx
from quipc.backends.onnx.emitter import QuipLinearEmitter
from quipc_runtime.hadamard import split_order
from quipc_runtime.modules import QuipLinearRef
from test_onnx_layer import make_layer

KRON_ONLY = {"dense_layer_max": 0}   # the Kronecker forms everywhere


def share_input_side(layers, name=lambda i, la: la.name):
    """The layers with the first one's in_scale and input transform, as q/k/v have in an artifact
    (each layer's own reference stays exact); name(i, layer) renames the others."""
    head = layers[0]
    return [head] + [dataclasses.replace(la, name=name(i, la), t_in=head.t_in, in_scale=head.in_scale)
                     for i, la in enumerate(layers[1:], 1)]


@functools.lru_cache(maxsize=None)
def group_layers(n, outs, bits, inc, bias=False):
    """Layers of different shapes that share the first one's input side (share_input_side)."""
    layers = [make_layer(m, n, bits, "quip", inc, bias, seed=i) for i, m in enumerate(outs)]
    return tuple(share_input_side(layers, name=lambda i, la: f"blk.0.proj{i}"))


def build(layers, ops="quip", rank=3, group=True, **kw):
    b = Builder()
    em = QuipLinearEmitter(b, ops=ops, accuracy_level=0, **kw)
    names = [f"y{i}" for i in range(len(layers))]
    if group:
        em.emit_group("x", layers, out_names=names, rank=rank)
    else:
        for la, o in zip(layers, names):
            em.emit("x", la, out_name=o, rank=rank)
    n = layers[0].in_features
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, n])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, None, la.out_features])
         for o, la in zip(names, layers)], list(b.initializers.values()))
    model = helper.make_model(graph, opset_imports=em.opsets(), functions=list(em.functions.values()))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def session(model, optimized_path=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def check_against_reference(layers, model, x):
    ys = session(model).run(None, {"x": x})
    for la, y in zip(layers, ys):
        ref = QuipLinearRef(la)(torch.from_numpy(x)).detach().numpy()
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# (n, outs, bits, incoherence): 48 = 12x4 and 96 = 12x8 hadamard, kron 2-factor sides,
# 40 (no MatMulNBits block); stacked output sides (same last factor): 96 = 12x8 twice,
# 320 = 20x16 with 192 = 12x16 (q/k/v-like), at 4 and 3 bits
GROUPS = [(48, (48, 24, 24), 4, "hadamard"), (48, (96, 96), 2, "hadamard"), (96, (48, 24), 3, "kron"),
          (48, (320, 24), 4, "hadamard"), (40, (40, 16), 4, "hadamard"),
          (48, (320, 192, 192), 4, "hadamard"), (96, (192, 320), 3, "hadamard")]
NO_STACK = {"stack_outputs": False}


@pytest.mark.parametrize("n,outs,bits,inc", GROUPS)
@pytest.mark.parametrize("ops,rank,kw", [("quip", 3, {}), ("quip", None, {}), ("quip", 3, KRON_ONLY),
                                         ("quip", 3, NO_STACK), ("std", 3, {}), ("std", None, KRON_ONLY)])
def test_group_matches_reference(n, outs, bits, inc, ops, rank, kw):
    layers = group_layers(n, outs, bits, inc, bias=bits == 3)
    model = build(layers, ops, rank, **kw)
    if ops == "quip":
        assert [nd.op_type for nd in model.graph.node] == ["QuipLinearGroup"]
        stacked = inc == "hadamard" and len({split_order(m)[1] for m in outs}) == 1 and kw != NO_STACK
        assert ("st" in model.functions[0].overload.split("_")) == stacked
    x = np.random.default_rng(1).standard_normal((2, 5, n)).astype(np.float32)
    check_against_reference(layers, model, x)


def test_group_falls_back_when_the_input_side_differs():
    layers = group_layers(48, (48, 24), 4, "hadamard")
    other = dataclasses.replace(layers[1], in_scale=(layers[1].in_scale * 2).astype(np.float16))
    model = build([layers[0], other])
    assert [nd.op_type for nd in model.graph.node] == ["QuipLinear", "QuipLinear"]
    x = np.random.default_rng(2).standard_normal((1, 3, 48)).astype(np.float32)
    check_against_reference([layers[0], other], model, x)


@pytest.mark.parametrize("outs,kw", [((320, 24), {}), ((320, 24), KRON_ONLY), ((320, 192), {})])
def test_layers_read_back(tmp_path, outs, kw):
    layers = group_layers(48, outs, 4, "hadamard", bias=True)
    path = tmp_path / "m.onnx"
    onnx.save(build(layers, **kw), str(path))
    back = layers_from_onnx(path)
    assert list(back) == [la.name for la in layers]
    for la in layers:
        got = back[la.name]
        for key in ("codes", "scale", "zero", "in_scale", "bias"):
            np.testing.assert_array_equal(getattr(got, key), getattr(la, key))
        for side in ("t_in", "t_out"):
            np.testing.assert_allclose(getattr(got, side).dense(), getattr(la, side).dense(), atol=1e-6)
    x = np.random.default_rng(3).standard_normal((1, 2, 48)).astype(np.float32)
    check_against_reference(list(back.values()), build(list(back.values()), **kw), x)


def optimized_ops(model, tmp_path) -> list[str]:
    """The node types onnxruntime runs after inlining, constant folding and fusions."""
    session(model, tmp_path / "opt.onnx")
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_fewer_nodes_after_optimization(tmp_path):
    """q/k/v-like 576 -> 576, 192, 192 at 4 bits: 42 nodes as three Kronecker QuipLinears;
    grouped, 16: in_scale Mul, K_in (Reshape, MatMul, MatMul, Reshape), MatMulNBits, the zero
    correction (ReduceSum, Mul, Add), the stacked output transform (36|12|12 x 16: Reshape,
    MatMul, MatMul by the block diagonal, Reshape), one sign Mul, Split."""
    layers = group_layers(576, (576, 192, 192), 4, "hadamard")
    before = optimized_ops(build(layers, group=False, **KRON_ONLY), tmp_path)
    after = optimized_ops(build(layers), tmp_path)
    kron = ["Reshape", "MatMul", "MatMul", "Reshape"]
    assert len(before) == 42 and sorted(after) == sorted(
        ["Mul", *kron, "MatMulNBits", "ReduceSum", "Mul", "Add", *kron, "Mul", "Split"])