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
    assert counts == {"rms_norm_divs": 1, "rotate_half_gathers": 1, "shared_shapes": 0}
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


def _shapes_graph(dims_b):
    """Two tensors of declared shapes (batch, seq, 4) and dims_b, each read by its own Shape
    of axes 0-1 and reshaped by the result, as every attention layer of the traced graph does."""
    f, n = TensorProto.FLOAT, helper.make_node
    four = numpy_helper.from_array(np.array([4], np.int64), "four")
    nodes = [n("Relu", ["x"], ["a"]), n("Neg", ["a"], ["b"]),
             n("Shape", ["a"], ["sa"], start=0, end=2), n("Shape", ["b"], ["sb"], start=0, end=2),
             n("Shape", ["b"], ["sc"], start=-1),
             n("Concat", ["sa", "four"], ["ta"], axis=0), n("Concat", ["sb", "sc"], ["tb"], axis=0),
             n("Reshape", ["a", "ta"], ["ya"]), n("Reshape", ["b", "tb"], ["yb"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f, ["batch", "seq", 4])],
        [helper.make_tensor_value_info(o, f, ["batch", "seq", 4]) for o in ("ya", "yb")], [four],
        value_info=[helper.make_tensor_value_info("a", f, ["batch", "seq", 4]),
                    helper.make_tensor_value_info("b", f, dims_b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_shapes_of_alike_named_dimensions_are_read_once():
    model = _shapes_graph(["batch", "seq", 4])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    want = _run(model, feeds)
    assert rewrite(model)["shared_shapes"] == 1
    onnx.checker.check_model(model, full_check=True)
    shapes = [nd for nd in model.graph.node if nd.op_type == "Shape"]
    assert [nd.output[0] for nd in shapes] == ["sa", "sc"]     # the last axis (4) is another slice
    assert next(nd for nd in model.graph.node if nd.output[0] == "tb").input[0] == "sa"
    for got, ref in zip(_run(model, feeds), want):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dims_b", [["batch", "other", 4], ["batch", None, 4], None])
def test_shapes_of_other_or_unknown_dimensions_are_kept(dims_b):
    model = _shapes_graph(dims_b if dims_b is not None else ["batch", "seq", 4])
    if dims_b is None:   # no declared shape for b at all
        del model.graph.value_info[1]
    assert rewrite(model)["shared_shapes"] == 0
    assert sum(nd.op_type == "Shape" for nd in model.graph.node) == 3
