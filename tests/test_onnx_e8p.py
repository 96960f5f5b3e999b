"""The e8p code format in the ONNX backend: decode tables, single layers and groups against the
reference decoder (QuipLinearRef), a tiny Llama exported end to end, the frontend, refusals."""
import dataclasses
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from quipc.backends.onnx import export_artifact
from quipc.backends.onnx.builder import Builder
from quipc.backends.onnx.emitter import QuipLinearEmitter
from quipc.backends.onnx.formats.e8p import arithmetic_tables, xor_tables
from quipc.backends.onnx.inspect import layers_from_onnx
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.frontend.onnx_model import compile_onnx
from quipc_runtime import load
from quipc_runtime.artifact import load_layers, read_manifest
from quipc_runtime.formats import UnsupportedFormatError
from quipc_runtime.formats.lattice import e8_one_bit_table, e8p_table
from quipc_runtime.modules import QuipLinearRef
from quipc_runtime.onnx_runtime import OnnxLM
from e8p_layers import random_e8p_layer
from test_onnx_export import assert_matches_torch_path
from tiny import make_tiny_onnx_lm


def build(layers, ops="quip", rank=3, group=False, opset=21, accuracy_level=0, **kw):
    b = Builder(opset=opset)
    em = QuipLinearEmitter(b, ops=ops, accuracy_level=accuracy_level, opset=opset, **kw)
    names = [f"y{i}" for i in range(len(layers))]
    if group:
        em.emit_group("x", layers, out_names=names, rank=rank)
    else:
        for la, o in zip(layers, names):
            em.emit("x", la, out_name=o, rank=rank)
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, layers[0].in_features])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, None, la.out_features])
         for o, la in zip(names, layers)], list(b.initializers.values()))
    model = helper.make_model(graph, opset_imports=em.opsets(), functions=list(em.functions.values()))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def check(layers, ys, x):
    for la, y in zip(layers, ys):
        ref = QuipLinearRef(la)(torch.from_numpy(x)).detach().numpy()
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_decode_tables_give_the_reference_points():
    """q = TA[lo] xor TB[hi] (and the arithmetic form) for all 2^16 E8P indices; one-bit table."""
    idx = np.arange(1 << 16)
    lo, hi = idx & 0xFF, idx >> 8
    ta, tb, t1 = xor_tables()
    q = (ta[lo] ^ tb[hi]).astype(np.float32)
    assert np.array_equal(0.5 * (q - 8) + 0.25, e8p_table())
    sa, sb, sh, t1i = arithmetic_tables()
    assert np.array_equal(8 + sa[lo] * sb[hi] - sh[hi], q.astype(np.int64))
    assert np.array_equal(0.5 * (t1.astype(np.float32) - 8), e8_one_bit_table()) and np.array_equal(t1, t1i)
    assert q.min() >= 0 and q.max() <= 15 and t1.min() >= 0 and t1.max() <= 15   # 4-bit codes


# (m, n): SmolLM2's 1536x576 and 576x1536, k/v-like 192x576, and 40 (no MatMulNBits block size)
SHAPES = [(1536, 576), (576, 1536), (192, 576), (40, 40)]
# (ops, rank, opset): MatMulNBits / standard ops, 3-D or flattened x, bitwise ops or the int64 form
MODES = [("quip", 3, 21), ("quip", None, 21), ("std", 3, 21), ("quip", 3, 17), ("std", None, 17)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", SHAPES)
def test_layer_matches_reference_decoder(bits, m, n):
    layer = random_e8p_layer(m, n, bits, seed=bits, bias=m == 192)
    rng = np.random.default_rng(1)
    for ops, rank, opset in MODES:
        model = build([layer], ops, rank, opset=opset)
        for shape in ((1, 1, n), (3, 5, n)):      # one decoded token; a batch of prefills
            x = rng.standard_normal(shape).astype(np.float32)
            check([layer], run(model, x), x)
        if ops == "quip":
            assert [nd.op_type for nd in model.graph.node] == ["QuipLinear"]
            expect = "e8p-repack4" if n % 16 == 0 else "e8p-unpack"
            assert model.functions[0].overload.startswith(expect + "_b%d" % bits)
            assert {a.name: a.s for a in model.graph.node[0].attribute}["format"] == b"e8p"
        codes = [i for i in model.graph.initializer if i.name.endswith(".codes")]
        assert [(list(c.dims), c.data_type) for c in codes] == [([m, n // 8 * bits], TensorProto.UINT8)]
        assert not any(i.name.endswith(".zero") for i in model.graph.initializer)


def test_tables_are_small_constants_and_std_shares_them():
    """The decode tables: 256 x 8 each, Constants of the function body (one copy per overload),
    or shared initializers when the body is inlined (std): never one per layer."""
    layers = [random_e8p_layer(48, 32, 3, seed=i, name=f"l{i}", bias=False) for i in range(3)]
    model = build(layers, "quip")
    consts = [a.t for f in model.functions for nd in f.node if nd.op_type == "Constant" for a in nd.attribute
              if a.type == onnx.AttributeProto.TENSOR]
    assert sum(np.prod(t.dims) for t in consts if np.prod(t.dims) > 64) == 3 * 256 * 8
    std = build(layers, "std")
    tables = sorted(i.name for i in std.graph.initializer if i.name.startswith("quipc.e8p."))
    assert tables == ["quipc.e8p.t1", "quipc.e8p.ta", "quipc.e8p.tb"]


def test_quantized_layer_at_accuracy_level_4():
    """A layer from the e8p encoder, MatMulNBits with int8 activations (the export default)."""
    from quipc.passes.methods import LayerInput, quantize_linear

    g = torch.Generator().manual_seed(0)
    w, xs = torch.randn(96, 64, generator=g), torch.randn(256, 64, generator=g)
    layer = quantize_linear(LayerInput("p", w, None, (xs.T.double() @ xs.double()) / 256),
                            QuantConfig(bits=2, format="e8p"))
    x = np.random.default_rng(2).standard_normal((1, 7, 64)).astype(np.float32)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).detach().numpy()
    (y,) = run(build([layer], accuracy_level=4), x)
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
    check([layer], run(build([layer]), x), x)


def qkv(n, outs, bits):
    head = random_e8p_layer(outs[0], n, bits, seed=0, name="blk.0.q", bias=False)
    return [head] + [random_e8p_layer(m, n, bits, seed=i, name=f"blk.0.p{i}", t_in=head.t_in,
                                      in_scale=head.in_scale, bias=False)
                     for i, m in enumerate(outs[1:], 1)]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_group_matches_reference_and_reads_back(bits, tmp_path):
    layers = qkv(576, (576, 192, 192), bits)
    x = np.random.default_rng(3).standard_normal((2, 3, 576)).astype(np.float32)
    for ops, kw in (("quip", {}), ("quip", {"stack_outputs": False}), ("std", {})):
        model = build(layers, ops, group=True, **kw)
        check(layers, run(model, x), x)
    assert [nd.op_type for nd in build(layers, group=True).graph.node] == ["QuipLinearGroup"]
    path = tmp_path / "g.onnx"
    onnx.save(build(layers, group=True), str(path))
    back = layers_from_onnx(path)
    for la in layers:
        got = back[la.name]
        assert got.format == "e8p" and got.zero is None
        assert np.array_equal(got.codes, la.codes) and np.array_equal(got.scale, la.scale)
        np.testing.assert_allclose(got.effective_weight(), la.effective_weight(), atol=1e-5)


def test_formats_are_not_mixed_in_a_group():
    e8p = qkv(64, (64, 32), 2)
    rng = np.random.default_rng(5)
    grid = dataclasses.replace(e8p[1], format="grid", codes=rng.integers(0, 256, (32, 16), dtype=np.uint8),
                               scale=np.full(32, 0.1, np.float16), zero=np.full(32, -0.15, np.float16))
    model = build([e8p[0], grid], group=True)
    assert sorted(nd.op_type for nd in model.graph.node) == ["QuipLinear", "QuipLinear"]
    assert sorted(f.overload.split("_")[0] for f in model.functions) == ["e8p-repack4", "repack4"]
    x = np.random.default_rng(4).standard_normal((1, 2, 64)).astype(np.float32)
    check([e8p[0], grid], run(model, x), x)


def test_unknown_format_is_refused(tmp_path):
    layer = dataclasses.replace(random_e8p_layer(32, 32, 2, bias=False), format="e9p")
    with pytest.raises(UnsupportedFormatError, match="ONNX backend runs the code format.*'e9p'"):
        build([layer])
    path = tmp_path / "t.onnx"
    model = build([random_e8p_layer(32, 32, 2, bias=False)])
    [a for a in model.graph.node[0].attribute if a.name == "format"][0].s = b"grid"   # tampered
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="format attribute 'grid' disagrees"):
        layers_from_onnx(path)
    model.graph.node[0].overload = model.graph.node[0].overload.replace("e8p-", "e9p-")
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="no lowering for code format 'e9p'"):
        layers_from_onnx(path)


# --- a tiny Llama compiled with format e8p, end to end --------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, folder, text, fp32 = make_tiny_onnx_lm(tmp_path_factory.mktemp("e8p"))
    arts = {}
    for bits in (2, 3, 4):
        arts[bits] = root / f"art{bits}"
        compile_model(str(folder), arts[bits], QuantConfig(bits=bits, format="e8p"),
                      CalibConfig(text=str(text), windows=8, length=32), progress=False)
    return root, folder, fp32, arts


def ids(n=20, seed=0):
    return torch.randint(3, 17, (1, n), generator=torch.Generator().manual_seed(seed))


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("bits,ops", [(2, "quip"), (3, "quip"), (4, "quip"), (2, "std")])
def test_tiny_llama_export_matches_torch_path(tiny, bits, ops):
    root, _, _, arts = tiny
    out = root / f"onnx{bits}_{ops}"
    path = export_artifact(arts[bits], out, ops=ops, progress=False, accuracy_level=1)   # fp32 activations
    model = onnx.load(str(path), load_external_data=False)
    assert json.loads((out / "quipc_onnx.json").read_text())["code_format"] == ["e8p"]
    if ops == "quip":
        nodes = [nd.op_type for nd in model.graph.node if nd.domain == "ai.quipc"]
        assert nodes == ["QuipLinearGroup", "QuipLinear"] * 4
        assert all(f.overload.startswith("e8p-repack4") for f in model.functions)
        want, back = load_layers(arts[bits], read_manifest(arts[bits])), layers_from_onnx(path)
        assert sorted(back) == sorted(want)
        for name, la in want.items():
            assert back[name].format == la.format == "e8p" and back[name].zero is None
            assert np.array_equal(back[name].codes, la.codes) and np.array_equal(back[name].scale, la.scale)
    assert_matches_torch_path(load(arts[bits]), OnnxLM(out, threads=1), ids(24, seed=bits))
    if bits == 2 and ops == "quip":   # deterministic: a second export is byte-identical
        again = export_artifact(arts[bits], root / "again", ops=ops, progress=False, accuracy_level=1)
        assert digest(again.parent) == digest(out)


def test_frontend_rtn_e8p_matches_torch_path(tiny):
    """An .onnx input quantized to e8p (RTN: no calibration) is the torch path's model."""
    root, folder, fp32, _ = tiny
    cfg = QuantConfig(method="rtn", bits=2, format="e8p")
    art = root / "art_rtn"
    compile_model(str(folder), art, cfg, CalibConfig(windows=8, length=32), progress=False)
    out = root / "rtn.onnx"
    compile_onnx(fp32, out, cfg, CalibConfig(windows=8, length=32), tokenizer=None, progress=False,
                 accuracy_level=0)
    assert {la.format for la in layers_from_onnx(out).values()} == {"e8p"}
    x = ids()
    with torch.no_grad():
        ref = load(art)(input_ids=x).logits[0].numpy()
    np.testing.assert_allclose(OnnxLM(out, threads=1).logits(x), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_frontend_sequential_e8p_reads_back_onto_torch_path(tiny):
    """QuIP with calibration from an .onnx input, format e8p: the file's layers, run on the
    torch reference path, give the file's logits."""
    from transformers import AutoModelForCausalLM

    from quipc.backends.onnx.inspect import torch_model_with

    root, folder, fp32, _ = tiny
    out = root / "seq3"
    summary = compile_onnx(fp32, out, QuantConfig(bits=3, format="e8p"),
                           CalibConfig(text=str(root / "calib.txt"), windows=8, length=32), tokenizer=str(folder),
                           progress=False, accuracy_level=0)
    assert summary["quantized_layers"] == 14
    layers = layers_from_onnx(out / "model.onnx")
    assert {la.format for la in layers.values()} == {"e8p"}
    model = torch_model_with(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), layers)
    x = ids(16)
    with torch.no_grad():
        ref = model(input_ids=x).logits[0].numpy()
    np.testing.assert_allclose(OnnxLM(out, threads=1).logits(x), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
