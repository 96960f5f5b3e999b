"""The "trellis" code format on every backend: a tiny trellis model through the torch path, and
trellis layers through ONNX (function bodies and the custom-op library), the C++ kernels (exact
and on the 8-bit copy of the rows) and TVM, each against the reference decoder."""
import json

import numpy as np
import pytest
import torch

import quipc
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc_runtime import artifact as art
from quipc_runtime import kernels
from quipc_runtime.formats.trellis import code_table
from trellis_layers import random_trellis_layer

TABLE = code_table()


@pytest.fixture(scope="module")
def trellis_artifact(tmp_path_factory):
    from tiny import make_tiny_llama, write_text

    root = tmp_path_factory.mktemp("trellis")
    model = make_tiny_llama(root / "model", hidden=64, intermediate=96)   # k/v 32 rows: tiles fit
    out = root / "w2"
    compile_model(str(model), out, QuantConfig(bits=2, format="trellis", seed=1),
                  CalibConfig(text=str(write_text(root / "calib.txt")), windows=8, length=32), progress=False)
    return model, out


def test_trellis_artifact_loads_and_computes_its_weights(trellis_artifact):
    from transformers import AutoModelForCausalLM

    model_dir, out = trellis_artifact
    man = json.loads((out / "manifest.json").read_text())
    layers = [layer for b in man["blocks"] for layer in b["layers"]]
    assert layers and all(layer["format"] == "trellis" for layer in layers)
    assert all(layer["proxy_loss"] < layer["proxy_loss_rtn"] for layer in layers)
    model = quipc.load(out)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, layer in art.load_layers(out, art.read_manifest(out)).items():
        ref.get_submodule(name).weight.data = torch.from_numpy(layer.effective_weight()).float()
    ids = torch.randint(3, 17, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_onnx_layers_match_the_reference_decoder(bits):
    """QuipLinear (function body) and the inlined standard ops, bitwise (opset 21) and int64
    arithmetic (opset 17), single layers and a q/k/v-like group."""
    pytest.importorskip("onnxruntime")
    from test_onnx_e8p import build, check, run

    layers = [random_trellis_layer(m, 64, bits, seed=i, name=f"l{i}") for i, m in enumerate((96, 32, 32))]
    rng = np.random.default_rng(1)
    for ops, opset, group in (("quip", 21, False), ("std", 21, False), ("quip", 17, False), ("std", 17, True),
                              ("quip", 21, True)):
        model = build(layers, ops, 3, group=group, opset=opset)
        x = rng.standard_normal((2, 3, 64)).astype(np.float32)
        check(layers, run(model, x), x)



def test_auto_accuracy_level_is_4_for_trellis_nodes_only():
    """accuracy_level None ("auto", the CLI's default): trellis nodes 4, grid nodes 0; the trellis
    function bodies (stock onnxruntime) give the same outputs at 0 and 4, to every bit."""
    pytest.importorskip("onnxruntime")
    from test_onnx_e8p import build, run
    from test_onnx_layer import make_layer

    trellis, grid = random_trellis_layer(96, 64, 4, seed=2, name="t"), make_layer(48, 64, 2)
    model = build([trellis, grid], rank=3, accuracy_level=None)
    levels = [next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in model.graph.node if n.domain == "ai.quipc"]
    assert levels == [4, 0]
    x = np.random.default_rng(3).standard_normal((1, 2, 64)).astype(np.float32)
    at0, at4 = (run(build([trellis], rank=3, accuracy_level=a), x)[0] for a in (0, 4))
    np.testing.assert_array_equal(at0, at4)

def test_onnx_export_computes_what_the_torch_path_computes(trellis_artifact, tmp_path):
    """The whole tiny model exported, run by its function bodies and, when built, by the
    custom-op library's kernels."""
    pytest.importorskip("onnxruntime")
    from quipc.backends.lower import lower_artifact   # --graph auto: what a user gets
    from quipc_runtime import ort_custom_ops
    from quipc_runtime.onnx_runtime import OnnxLM

    ids = torch.randint(3, 17, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = quipc.load(trellis_artifact[1])(ids).logits
    out = lower_artifact(trellis_artifact[1], tmp_path / "onnx", target="onnx", progress=False, accuracy_level=0)
    assert ort_custom_ops.formats_in(out) == {"trellis"} and ort_custom_ops.runs(out)
    for custom in ([False, True] if ort_custom_ops.available() else [False]):
        lm = OnnxLM(out, threads=1, custom_ops=custom)
        got = np.asarray(lm.logits(ids.numpy())).reshape(want.shape)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
def test_cpp_code_table_is_the_python_one():
    assert np.array_equal(kernels._ext.trellis_code_table(), TABLE)


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("force_scalar", [False, True])
def test_cpp_kernels_match_the_reference_decoder(bits, force_scalar):
    """GEMV (batch <= 4) and decode-panel GEMM, AVX2 and scalar, against QuipLinearRef."""
    from quipc_runtime.modules import QuipLinearRef

    layer = random_trellis_layer(48, 80, bits, seed=bits)      # the last rows' loads stay in bounds
    plan = kernels.prepare(layer, trellis_as_int8=False)
    for batch in (1, 3, 9):
        x = np.random.default_rng(batch).standard_normal((batch, 80)).astype(np.float32)
        want = QuipLinearRef(layer)(torch.from_numpy(x)).detach().numpy()
        got = kernels.quip_linear(plan, x, threads=2, force_scalar=force_scalar)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("force_scalar", [False, True])
def test_cpp_int8_gemv_is_each_row_rounded_to_8_bits(bits, int8_activations, force_scalar):
    """trellis_as_int8: the GEMV (batch 1-4, AVX2 and scalar) multiplies by W' rounded per row to
    127 steps of its largest |W'| (int8_rows, from the reference decoder); n = 80 ends in a half
    block of the kernels' 32; batch > 4 (the GEMM) stays exact."""
    layer = random_trellis_layer(48, 80, bits, seed=bits)
    plan = kernels.prepare(layer, int8_activations=int8_activations, trellis_as_int8=True)
    exact = kernels.prepare(layer, trellis_as_int8=False)
    assert plan.gemv_on_int8_rows and plan.gemv_int8 == int8_activations and not exact.gemv_on_int8_rows
    from quipc_runtime.int8_rows import int8_planes, rows_as_int8

    w = layer.rotated_weight()
    q, step = rows_as_int8(w)
    assert np.abs(q).max() == 127 and np.all(np.abs(q * step[:, None] - w) <= 0.5 * step[:, None] * (1 + 1e-5))
    hi, lo, scale, zero = int8_planes(q, step)           # TVM's two-plane form of the same rows
    assert hi.max() <= 15 and lo.max() <= 15
    np.testing.assert_allclose(scale[:, :1] * hi + scale[:, 1:] * lo + zero[:, None], q * step[:, None],
                               rtol=1e-6, atol=1e-6 * np.abs(w).max())
    w8 = q.astype(np.float64) * step[:, None]
    for batch in (1, 2, 3, 4):
        z = np.random.default_rng(batch).standard_normal((batch, 80)).astype(np.float32)
        t = plan.matmul(z, z.sum(axis=1), threads=2, force_scalar=force_scalar)
        want = z.astype(np.float64) @ w8.T
        tol = 2e-2 if int8_activations else 1e-5    # int8 activations: ~1e-3 of the output (test_kernels_int8)
        assert np.abs(t - want).max() <= tol * np.abs(want).max()
        off = np.abs(z.astype(np.float64) @ w.T.astype(np.float64) - want).max()   # the copy moves the output
        assert off > 1e-5 * np.abs(want).max()
    x = np.random.default_rng(2).standard_normal((9, 80)).astype(np.float32)
    np.testing.assert_array_equal(kernels.quip_linear(plan, x), kernels.quip_linear(exact, x))


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
def test_cpp_int8_gemv_on_int8_activations_is_exact_in_integers():
    """On int8 activations the scalar and AVX2 kernels compute the same integer block sums
    (vpsignb + vpmaddubsw never saturate at |q| <= 127): their outputs agree to float rounding."""
    layer = random_trellis_layer(64, 96, 2, seed=5)
    plan = kernels.prepare(layer, int8_activations=True, trellis_as_int8=True)
    z = (np.random.default_rng(0).standard_normal((4, 96)) * 50).astype(np.float32)
    a = plan.matmul(z, z.sum(axis=1), threads=1, force_scalar=False)
    b = plan.matmul(z, z.sum(axis=1), threads=1, force_scalar=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
def test_kernel_backend_runs_the_model(trellis_artifact):
    ids = torch.randint(3, 17, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = quipc.load(trellis_artifact[1])(ids).logits
        got = quipc.load(trellis_artifact[1], backend="kernels")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    kernel_layers = [m for m in quipc.load(trellis_artifact[1], backend="kernels").modules()
                     if isinstance(m, kernels.KernelQuipLinear)]
    assert kernel_layers and all(m._plan.gemv_on_int8_rows for m in kernel_layers)   # by default, decode on 8-bit rows
    exact = [m for m in quipc.load(trellis_artifact[1], backend="kernels", trellis_as_int8="head").modules()
             if isinstance(m, kernels.KernelQuipLinear)]
    assert exact and not any(m._plan.gemv_on_int8_rows for m in exact)   # "head": the blocks' GEMVs exact


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
def test_kernel_backend_can_run_every_trellis_gemv_on_8_bit_rows(trellis_artifact):
    """trellis_as_int8="all": the blocks' decode GEMVs on their 8-bit copies too; a decode
    step's logits within the rounding of the torch path's, and no longer exact; the prefill
    (the GEMM) exact. An unknown scope is refused."""
    ids = torch.randint(3, 17, (1, 1), generator=torch.Generator().manual_seed(0))
    model = quipc.load(trellis_artifact[1], backend="kernels", trellis_as_int8="all")
    kernel_layers = [m for m in model.modules() if isinstance(m, kernels.KernelQuipLinear)]
    assert kernel_layers and all(m._plan.gemv_on_int8_rows for m in kernel_layers)
    with torch.no_grad():
        want = quipc.load(trellis_artifact[1])(ids).logits
        got = model(ids).logits
        prefill = torch.randint(3, 17, (1, 9), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(prefill).logits, quipc.load(trellis_artifact[1])(prefill).logits,
                                   atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)
    with pytest.raises(ValueError, match="trellis_as_int8"):
        quipc.load(trellis_artifact[1], backend="kernels", trellis_as_int8="blocks")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tvm_kernels_match_the_reference_decoder(bits):
    pytest.importorskip("tvm")
    from quipc_runtime.modules import QuipLinearRef
    from test_tvm_e8p import run_kernel

    layer = random_trellis_layer(64, 96, bits, seed=bits)
    for mode, rows in (("gemv", 1), ("gemv", 3), ("gemm", 16)):
        x, y = run_kernel(layer, mode, rows)
        want = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())


def test_tvm_build_of_the_model_matches_the_torch_path(trellis_artifact, tmp_path):
    pytest.importorskip("tvm")
    from quipc.backends.tvm import compile_artifact
    from quipc_runtime.tvm_runtime import TvmLM
    from test_tvm import assert_matches_torch_path

    out = compile_artifact(trellis_artifact[1], tmp_path / "tvm", progress=False)
    assert json.loads((out / "tvm_config.json").read_text())["formats"] == ["trellis"]
    assert_matches_torch_path(quipc.load(trellis_artifact[1]), TvmLM(out, threads=2), new_tokens=6)
