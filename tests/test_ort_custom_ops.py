"""quipc's onnxruntime custom-op library (cpp/ort, quipc_runtime.ort_custom_ops) against the
ONNX function bodies of the same file: QuipLinear / QuipLinearGroup layers of both code formats
at bits 2/3/4, a tiny Llama (prefill and decode with the KV cache, batch 1 and 2), the profiler's
proof that the fused kernel ran, a runtime older than the library's API, malformed inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from quipc.backends.lower import lower_artifact
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc_runtime import ort_custom_ops
from quipc_runtime.onnx_runtime import OnnxLM
from e8p_layers import random_e8p_layer
from test_onnx_e8p import build, qkv
from test_onnx_group import group_layers, share_input_side
from test_onnx_layer import make_layer
from tiny import make_tiny_llama, write_text


def session(model, custom_ops, threads=2, profile_dir=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if custom_ops:
        ort_custom_ops.register(so, threads)
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "prof")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run_profiled(model, custom_ops, feeds, tmp_path, threads=2):
    """(outputs, op types of the nodes onnxruntime ran, from its profiler)."""
    sess = session(model, custom_ops, threads, profile_dir=tmp_path)
    outs = sess.run(None, feeds)
    events = json.loads(open(sess.end_profiling()).read())
    return outs, {e["args"]["op_name"] for e in events if e.get("cat") == "Node"}


def assert_close(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_library_is_built_and_found():
    path = ort_custom_ops.library_path()
    assert path is not None and path.is_file()


# --- layers: the fused kernel against the function body of the same model ------------------
GRID = [(96, 48, 2, "quip", "hadamard", False), (96, 48, 3, "quip", "hadamard", True),
        (320, 48, 4, "quip", "hadamard", False), (48, 96, 4, "quip", "kron", False),
        (40, 40, 4, "quip", "hadamard", True), (48, 64, 2, "rtn", "hadamard", False),
        (36, 72, 3, "quip", "kron", False)]
E8P = [(64, 64, 2), (192, 576, 3), (40, 40, 4)]
LAYERS = ([("grid", c) for c in GRID] + [("e8p", c) for c in E8P])
BATCHES = [(1, 1), (3, 5)]   # decode-like and prefill-like rows


def make(fmt, case):
    return make_layer(*case) if fmt == "grid" else random_e8p_layer(*case, bias=case[0] == 40)


@pytest.mark.parametrize("fmt,case", LAYERS)
def test_layer_kernel_matches_function_body(fmt, case, tmp_path):
    layer = make(fmt, case)
    model = build([layer], accuracy_level=1)   # fp32 activations: the body's math
    for b, s in BATCHES:
        x = np.random.default_rng(b).standard_normal((b, s, layer.in_features)).astype(np.float32)
        (want,), body_ops = run_profiled(model, False, {"x": x}, tmp_path)
        (got,), kernel_ops = run_profiled(model, True, {"x": x}, tmp_path)
        assert kernel_ops == {"QuipLinear"}          # one fused kernel call, nothing else
        assert "QuipLinear" not in body_ops and len(body_ops) > 1
        assert_close(got, want)


GROUPS = [("grid", lambda: group_layers(48, (48, 24, 24), 4, "hadamard")),
          ("grid", lambda: group_layers(48, (96, 96), 2, "hadamard")),
          ("grid", lambda: group_layers(96, (48, 24), 3, "kron")),
          ("e8p", lambda: qkv(64, (64, 32, 32), 2)), ("e8p", lambda: qkv(128, (128, 64), 3)),
          ("e8p", lambda: qkv(64, (128, 64), 4))]


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("k", range(len(GROUPS)))
def test_group_kernel_matches_function_body(k, stack, tmp_path):
    layers = list(GROUPS[k][1]())
    model = build(layers, group=True, stack_outputs=stack, accuracy_level=1)
    assert [nd.op_type for nd in model.graph.node] == ["QuipLinearGroup"]
    for b, s in BATCHES:
        x = np.random.default_rng(b).standard_normal((b, s, layers[0].in_features)).astype(np.float32)
        want, _ = run_profiled(model, False, {"x": x}, tmp_path)
        got, ops = run_profiled(model, True, {"x": x}, tmp_path)
        assert ops == {"QuipLinearGroup"} and len(got) == len(layers)
        for g, w in zip(got, want):
            assert_close(g, w)


def trellis_group(n, outs, bits):
    from trellis_layers import random_trellis_layer

    return share_input_side([random_trellis_layer(m, n, bits, seed=i, name=f"blk.0.t{i}")
                             for i, m in enumerate(outs)])


# A group's decode GEMVs run in one parallel region on an input prepared once
# (QuipLinearPlan::matmul_group): every GEMV path, fp32 and int8 activations.
GEMV_GROUPS = [("grid4", lambda: group_layers(96, (96, 48, 40), 4, "hadamard")),
               ("grid3", lambda: group_layers(96, (48, 24), 3, "kron")),
               ("e8p2", lambda: qkv(64, (64, 32, 32), 2)), ("e8p3", lambda: qkv(128, (128, 64), 3)),
               ("trellis4", lambda: trellis_group(64, (96, 48), 4))]


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("name,make_group", GEMV_GROUPS)
def test_group_equals_its_parts_as_separate_nodes(name, make_group, level):
    """The group's outputs are its parts' own nodes' outputs to the bit (each row computed by one
    thread the same way), at decode batches (the GEMVs) and a prefill batch (the GEMMs)."""
    layers = list(make_group())
    group = session(build(layers, group=True, accuracy_level=level), True, threads=2)
    parts = session(build(layers, group=False, accuracy_level=level), True, threads=2)
    for b, s in ((1, 1), (3, 1), (1, 7)):
        x = np.random.default_rng(b * s).standard_normal((b, s, layers[0].in_features)).astype(np.float32)
        for g, p in zip(group.run(None, {"x": x}), parts.run(None, {"x": x})):
            np.testing.assert_array_equal(g, p)


def test_results_do_not_depend_on_the_thread_count():
    """Work is split by rows (each output element computed by one thread): bitwise equal."""
    layers = list(qkv(576, (576, 192, 192), 2))
    model = build(layers, group=True)
    x = np.random.default_rng(5).standard_normal((3, 5, 576)).astype(np.float32)
    one, two = session(model, True, threads=1).run(None, {"x": x}), session(model, True, threads=2).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(one, two))


def test_kernel_matches_quipc_runtime_kernels():
    """The same C++ kernels as quipc_runtime's backend: equal up to float rounding."""
    from quipc_runtime import kernels

    for layer in (make_layer(96, 48, 3, bias=True), random_e8p_layer(192, 576, 2, bias=False)):
        x = np.random.default_rng(7).standard_normal((4, layer.in_features)).astype(np.float32)
        (got,) = session(build([layer], rank=None, accuracy_level=1), True).run(None, {"x": x[None]})
        want = kernels.prepare(layer).forward(x)
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_accuracy_level_picks_the_activations():
    """A node's accuracy_level (MatMulNBits' minimum accuracy of the activations) picks its 4-bit
    GEMVs' activations: 1-3 fp32, 4 int8 (quipc_runtime.kernels.prepare(int8_activations=True)),
    and 0 ("unset": the kernel's choice) int8. Prefill-size batches run the fp32 GEMM at every level."""
    from quipc_runtime import kernels

    for layer in (make_layer(320, 48, 4), random_e8p_layer(192, 576, 2, bias=False)):
        x = np.random.default_rng(8).standard_normal((4, layer.in_features)).astype(np.float32)
        sessions = {a: session(build([layer], rank=None, accuracy_level=a), True) for a in (0, 1, 3, 4)}
        want = kernels.prepare(layer, int8_activations=True).forward(x)
        exact = kernels.prepare(layer).forward(x)
        for a in (0, 4):
            got = sessions[a].run(None, {"x": x[None]})[0][0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            assert not np.allclose(got, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
        for a in (1, 3):
            np.testing.assert_allclose(sessions[a].run(None, {"x": x[None]})[0][0], exact, rtol=1e-5,
                                       atol=1e-5 * np.abs(exact).max())
        rows = np.random.default_rng(9).standard_normal((1, 9, layer.in_features)).astype(np.float32)
        for a in (0, 4):
            np.testing.assert_array_equal(sessions[a].run(None, {"x": rows})[0], sessions[1].run(None, {"x": rows})[0])


def test_trellis_nodes_decode_on_8bit_rows_at_every_accuracy_level():
    """A trellis node's GEMV (batch <= 4) runs on its rows rounded to 8 bits at every accuracy_level
    (kernels.prepare(trellis_as_int8=True)), on fp32 activations at 1-3 and int8 ones at 0 and 4;
    not the exact code-table GEMV. Prefill-size batches run the exact GEMM at every level."""
    from quipc_runtime import kernels
    from trellis_layers import random_trellis_layer

    layer = random_trellis_layer(96, 64, 4, seed=3)
    x = np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32)
    rows = np.random.default_rng(9).standard_normal((9, 64)).astype(np.float32)
    exact = kernels.prepare(layer)
    for level in (0, 1, 4):
        sess = session(build([layer], rank=None, accuracy_level=level), True)
        want = kernels.prepare(layer, trellis_as_int8=True, int8_activations=level != 1).forward(x)
        got = sess.run(None, {"x": x[None]})[0][0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert not np.allclose(got, exact.forward(x), rtol=1e-5, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(sess.run(None, {"x": rows[None]})[0][0], exact.forward(rows),
                                   rtol=1e-5, atol=1e-5 * np.abs(want).max())

# --- a tiny Llama, both formats: prefill and decode with the KV cache --------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ortlib")
    folder, text = make_tiny_llama(root / "hf"), write_text(root / "calib.txt")
    outs = {}
    for fmt, bits in (("e8p", 2), ("grid", 3)):
        art = root / f"art_{fmt}{bits}"
        compile_model(str(folder), art, QuantConfig(bits=bits, format=fmt),
                      CalibConfig(text=str(text), windows=8, length=32), progress=False)
        outs[fmt] = lower_artifact(art, root / f"onnx_{fmt}{bits}", target="onnx", progress=False,
                                   accuracy_level=1)   # fp32 activations: the bodies' math
    return outs


def empty_past(sess, batch):
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past")}


@pytest.mark.parametrize("fmt", ["e8p", "grid"])
def test_tiny_llama_prefill_and_decode_match_function_bodies(tiny, fmt, tmp_path):
    path = tiny[fmt]
    with_lib, without = session(path, True), session(path, False)
    ids = np.random.default_rng(3).integers(3, 17, (2, 9)).astype(np.int64)
    names = [o.name for o in with_lib.get_outputs()]
    for batch in (1, 2):
        feeds = {"input_ids": ids[:batch], **empty_past(with_lib, batch)}
        got, want = with_lib.run(None, feeds), without.run(None, feeds)
        for g, w in zip(got, want):
            assert_close(g, w)
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], want[1:])}
        step = {"input_ids": ids[:batch, :1], **past}      # one decode step on the cache
        for g, w in zip(with_lib.run(None, step), without.run(None, step)):
            assert_close(g, w)
    _, ops = run_profiled(path, True, {"input_ids": ids[:1], **empty_past(with_lib, 1)}, tmp_path)
    assert {"QuipLinear", "QuipLinearGroup"} <= ops and "MatMulNBits" not in ops


def test_onnxlm_uses_the_library_by_default_and_can_be_told_not_to(tiny):
    fast, stock = OnnxLM(tiny["e8p"], threads=2), OnnxLM(tiny["e8p"], threads=2, custom_ops=False)
    assert fast.custom_ops and not stock.custom_ops
    prompt = torch.randint(3, 17, (1, 12), generator=torch.Generator().manual_seed(1))
    assert_close(fast.logits(prompt), stock.logits(prompt))
    assert np.array_equal(fast.generate(prompt, 8), stock.generate(prompt, 8))


# --- failures: clean onnxruntime errors, never a crash ----------------------------------------
REFUSE = """
import onnxruntime as ort
from quipc_runtime import ort_custom_ops
try:
    ort_custom_ops.register(ort.SessionOptions())
except RuntimeError as e:
    print("REFUSED:", e)
"""


def test_runtime_older_than_the_library_is_refused_cleanly():
    newer = int(ort.__version__.split(".")[1]) + 1     # an API this onnxruntime does not have
    env = dict(os.environ, QUIPC_ORT_API_VERSION=str(newer))
    r = subprocess.run([sys.executable, "-c", REFUSE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"needs onnxruntime C API version {newer}" in r.stdout and ort.__version__ in r.stdout


def inputs_from_initializers(model, names, types=None):
    """The model with the initializers `names` turned into graph inputs (fed at run time,
    of their own type unless `types` names another) and x's last axis left free."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for name in names:
        init = next(i for i in g.initializer if i.name == name)
        dtype = (types or {}).get(name, init.data_type)
        g.input.append(onnx.helper.make_tensor_value_info(name, dtype, [None] * len(init.dims)))
        g.initializer.remove(init)
    g.input[0].type.tensor_type.shape.dim[2].dim_param = "n"
    return model


def test_malformed_inputs_are_onnxruntime_errors():
    layer = make_layer(96, 48, 2)
    model = inputs_from_initializers(build([layer]), ["blk.0.proj.codes", "blk.0.proj.scale"])
    sess = session(model, True)
    x = np.ones((1, 2, 48), np.float32)
    feeds = {"x": x, "blk.0.proj.codes": layer.codes, "blk.0.proj.scale": layer.scale}
    (y,) = sess.run(None, feeds)     # weights fed at run time: prepared on each call
    assert_close(y, session(build([layer]), True).run(None, {"x": x})[0])
    bad = [({"x": np.ones((1, 2, 47), np.float32)}, r"x is float32 \(1, 2, 47\), expected float32 with last axis 48"),
           ({"blk.0.proj.codes": layer.codes[:, :-1]}, r"codes are uint8 \(96, 11\), expected 12 bytes a row"),
           ({"blk.0.proj.codes": layer.codes[:-1]}, r"codes have 95 rows"),
           ({"blk.0.proj.scale": layer.scale[:-3]}, r"scale is float16 \(93,\), expected 96 values"),
           ({"x": np.ones((1, 2, 48))}, r"Unexpected input data type")]      # onnxruntime's check
    for change, message in bad:
        with pytest.raises(Exception, match=message):   # onnxruntime's own exception types
            sess.run(None, {**feeds, **change})
    assert_close(sess.run(None, feeds)[0], y)             # the session still works
    # a weight of the wrong element type reaches the kernel when the graph declares it so
    f32_scale = inputs_from_initializers(build([layer]), ["blk.0.proj.scale"],
                                         {"blk.0.proj.scale": onnx.TensorProto.FLOAT})
    with pytest.raises(Exception, match=r"input 2: scale: expected a rank-1 float16 tensor, got float32 \(96,\)"):
        session(f32_scale, True).run(None, {"x": x, "blk.0.proj.scale": layer.scale.astype(np.float32)})


def test_cli_and_bench_switches(tiny):
    from quipc.cli import _lowered_model, build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "m", "--text", "t", "--no-onnx-custom-ops"]).no_onnx_custom_ops
    assert parser.parse_args(["bench", "a", "--no-onnx-custom-ops"]).no_onnx_custom_ops
    for custom_ops, used in ((None, True), (False, False)):
        _, _, what = _lowered_model(str(tiny["e8p"].parent), custom_ops=custom_ops)
        assert what["custom_ops"] is used
