"""quipc.backends.onnx.fusable: the traced graph's RMSNorm and rotate_half rewritten into the
forms onnxruntime fuses, with the same outputs; patterns that only look alike are left alone."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quipc.backends.onnx.fusable import rewrite


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _graph(slice_axis=3, half=4, starts=(0, 4)):
    """RMSNorm of x (B, T, H*D) then rotate_half on (B, H, T, D) as the dynamo exporter writes them."""
    D = 2 * half
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [c("two", np.float32(2)), c("eps", np.float32(1e-6)), c("ax", np.array([-1], np.int64)),
             c("w", np.linspace(0.5, 1.5, 2 * D).astype(np.float32)),
             c("shape", np.array([1, 3, 2, D], np.int64)),
             c("s0", np.array([starts[0]], np.int64)), c("e0", np.array([half], np.int64)),
             c("s1", np.array([starts[1]], np.int64)), c("e1", np.array([2 ** 62], np.int64)),
             c("axis", np.array([slice_axis], np.int64)), c("one", np.array([1], np.int64))]
    n = helper.make_node
    nodes = [n("Pow", ["x", "two"], ["p"]), n("ReduceMean", ["p", "ax"], ["m"], keepdims=1),
             n("Add", ["m", "eps"], ["a"]), n("Sqrt", ["a"], ["s"]), n("Reciprocal", ["s"], ["r"]),
             n("Mul", ["x", "r"], ["xn"]), n("Mul", ["w", "xn"], ["h"]),
             n("Reshape", ["h", "shape"], ["hr"]), n("Transpose", ["hr"], ["q"], perm=[0, 2, 1, 3]),
             n("Mul", ["q", "cos"], ["qc"]),
             n("Slice", ["q", "s0", "e0", "axis", "one"], ["x1"]),
             n("Slice", ["q", "s1", "e1", "axis", "one"], ["x2"]),
             n("Neg", ["x2"], ["nx2"]), n("Concat", ["nx2", "x1"], ["cat"], axis=-1),
             n("Mul", ["cat", "sin"], ["qs"]), n("Add", ["qc", "qs"], ["y"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 3, 2 * D]),
                                           helper.make_tensor_value_info("cos", f, [1, 1, 3, D]),
                                           helper.make_tensor_value_info("sin", f, [1, 1, 3, D])],
                              [helper.make_tensor_value_info("y", f, [1, 2, 3, D])], inits,
                              value_info=[helper.make_tensor_value_info("q", f, [1, 2, 3, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _feeds(D=8):
    rng = np.random.default_rng(0)
    ang = rng.uniform(0, 6, (1, 1, 3, D)).astype(np.float32)
    return {"x": rng.standard_normal((1, 3, 2 * D)).astype(np.float32), "cos": np.cos(ang), "sin": np.sin(ang)}


def test_rewrites_keep_the_outputs_and_drop_the_nodes():
    model, feeds = _graph(), _feeds()
    want = _run(model, feeds)[0]
    counts = rewrite(model)
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(nd.op_type for nd in model.graph.node)
    assert counts == {"rms_norm_divs": 1, "rotate_half_gathers": 1}
    assert ops["Reciprocal"] == ops["Neg"] == ops["Concat"] == ops["Slice"] == 0
    assert ops["Div"] == 1 and ops["Gather"] == 1
    np.testing.assert_allclose(_run(model, feeds)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(slice_axis=2), dict(starts=(1, 4)), dict(starts=(0, 3))])
def test_lookalikes_are_left_alone(kw):
    """A slice of another axis, or halves that do not split the axis at h: not rotate_half."""
    model = _graph(**kw)
    counts = rewrite(model)
    assert counts["rotate_half_gathers"] == 0
    assert Counter(nd.op_type for nd in model.graph.node)["Neg"] == 1
