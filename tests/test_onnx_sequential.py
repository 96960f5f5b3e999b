"""Sequential calibration of ONNX graphs (quipc.frontend.onnx_sequential): the segments
reproduce the model, each stage sees the model with its earlier layers quantized."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quipc.compile import CalibConfig
from quipc.config import QuantConfig
from quipc.frontend.onnx_model import collect_hessians, compile_onnx
from quipc.frontend.onnx_targets import find_targets, load_checked
from quipc.frontend.onnx_segments import Segmenter
from quipc.frontend.onnx_sequential import effective_initializer, lm_feeds, plan_stages, run_sequential
from quipc.passes.methods import LayerInput, quantize_linear
from quipc_runtime.onnx_runtime import OnnxLM
from tiny import make_tiny_onnx_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_onnx_lm(tmp_path_factory.mktemp("onnxseq"))


def windows(n=3, length=16, seed=0):
    return torch.randint(3, 17, (n, length), generator=torch.Generator().manual_seed(seed))


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def one_pass_hessians(model, names, feeds, tokens):
    """E[x x^T] of `names` from one run of the whole model (as collect_hessians does)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    sess = session(m)
    out = {}
    for f in feeds:
        for n, v in zip(names, sess.run(names, f)):
            a = torch.from_numpy(np.asarray(v, np.float32).reshape(-1, v.shape[-1]))
            out[n] = out.get(n, 0) + (a.T @ a).double()
    return {n: v / tokens for n, v in out.items()}


def assert_close_h(a, b, rtol=1e-5):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= rtol * scale + 1e-12, float((a - b).abs().max()) / scale


def with_weights(model, targets, weights: dict):
    """A copy of `model` in which each target's B input evaluates to its weight in `weights`
    (name -> (out, in)), by rewriting the initializer behind it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    for t in targets:
        if t.name not in weights:
            continue
        w = np.asarray(weights[t.name], np.float32)
        (name,) = t.weight_names
        old = numpy_helper.to_array(inits[name])
        trans_b = t.node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in t.node.attribute)
        behind_transpose = t.node.input[1] != name
        new = w if trans_b != behind_transpose else w.T
        assert new.shape == old.shape
        inits[name].CopyFrom(numpy_helper.from_array(new.astype(old.dtype), name))
    return m


# --- segmentation is exact ------------------------------------------------------------------
def test_segments_reproduce_the_model(tiny):
    root, folder, text, path = tiny
    src = load_checked(path)
    targets, _ = find_targets(src)
    stages = plan_stages(targets)
    assert len(stages) == 8 and [len(s.targets) for s in stages] == [3, 1, 2, 1] * 2   # qkv, o, gate/up, down
    assert [s.cut for s in stages] == sorted(s.cut for s in stages)
    seg = Segmenter(src)
    inits = {i.name for i in src.graph.initializer}
    for s in stages:
        b = seg.boundary(s.cut)
        assert s.x in b and not inits & set(b)
    wins = windows()
    feeds = lm_feeds(src, wins)
    outputs = [o.name for o in src.graph.output]
    hs = {}
    res = run_sequential(src, targets, feeds, int(wins.numel()), None, threads=1,
                         on_hessian=lambda x, h: hs.setdefault(x, h), final_outputs=outputs)
    assert res.layers == {} and set(res.ranks.values()) == {3}
    full = session(src)
    for f, got in zip(feeds, res.outputs):
        ref = full.run(outputs, f)
        for name, r in zip(outputs, ref):
            np.testing.assert_allclose(got[name], r, rtol=1e-5, atol=1e-5 * max(np.abs(r).max(), 1e-6))
    # the one-pass Hessians (collect_hessians on the fp32 model), for every stage
    ref, ranks = collect_hessians(src, path, targets, wins, 1, False)
    assert set(hs) == set(ref) and ranks == res.ranks
    for x in hs:
        assert_close_h(hs[x], ref[x])


def _generic_model():
    """Not an LM: a Constant read far away, an If whose branches read an outer tensor, a
    model-local function, Gemm(transB) with bias, a weight behind a Transpose, and a target of
    the first stage that lies after the later cuts."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)          # MatMul B: (in, out)
    w2 = rng.normal(size=(8, 16)).astype(np.float32)          # Gemm transB: (out, in)
    b2 = rng.normal(size=8).astype(np.float32)
    w3 = rng.normal(size=(6, 8)).astype(np.float32)           # Transpose'd to (8, 6)
    w4 = rng.normal(size=(8, 6)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("Add", ["y2", "xn"], ["z_then"])], "then", [],
                               [helper.make_tensor_value_info("z_then", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Sub", ["y2", "xn"], ["z_else"])], "else", [],
                               [helper.make_tensor_value_info("z_else", TensorProto.FLOAT, None)])
    act = helper.make_function("local", "Act", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                               [helper.make_opsetid("", 17)])
    nodes = [
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.float32(-1e9))),
        helper.make_node("Mul", ["x", "half"], ["x0"]),
        helper.make_node("Neg", ["x"], ["xn"]),                                    # read in the If only
        helper.make_node("MatMul", ["x0", "w1"], ["y1"]),                          # stage 0
        helper.make_node("Act", ["y1"], ["r1"], domain="local"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["y2"], transB=1),             # stage 1
        helper.make_node("ReduceMean", ["x"], ["mx"], keepdims=0),
        helper.make_node("Greater", ["mx", "lo"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Transpose", ["w3"], ["w3t"]),
        helper.make_node("MatMul", ["z", "w3t"], ["y3"]),                          # stage 2
        helper.make_node("MatMul", ["x0", "w4"], ["y4"]),                          # stage 0, after cut 2
        helper.make_node("Add", ["y3", "y4"], ["s"]),
        helper.make_node("Mul", ["s", "half"], ["out"]),
    ]
    g = helper.make_graph(nodes, "generic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 6])],
                          [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b2, "b2"),
                                                                       (w3, "w3"), (w4, "w4"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=[act])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


class _Perturbed:
    """A stand-in for a QuantizedLinear: its effective weight is the weight plus noise."""

    def __init__(self, w, seed):
        self.w = w + np.random.default_rng(seed).normal(scale=0.3, size=w.shape).astype(np.float32)

    def effective_weight(self):
        return self.w.astype(np.float64)


def test_generic_graph_segments_and_substitution():
    m = _generic_model()
    targets, skipped = find_targets(m)
    assert not skipped and [t.name for t in targets] == ["w1", "w2", "w3", "w4"]
    stages = plan_stages(targets)
    assert [s.x for s in stages] == ["x0", "r1", "z"] and [t.name for t in stages[0].targets] == ["w1", "w4"]
    seg = Segmenter(m)
    # the If reads xn inside its branches only: xn crosses the cut before the If's segment;
    # Constants and initializers never cross; x0 is read by the last target (stage 0)
    assert "xn" in seg.boundary(stages[1].cut) and "xn" not in seg.boundary(stages[2].cut)
    assert "x0" in seg.boundary(stages[2].cut) and "r1" in seg.boundary(stages[1].cut)
    assert not {"half", "lo", "w1", "w2", "w3", "w4", "b2"} & {n for s in stages for n in seg.boundary(s.cut)}
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(5, 8)).astype(np.float32)} for _ in range(3)]
    tokens = 15
    # no substitution: the model's output and its one-pass Hessians
    hs = {}
    res = run_sequential(m, targets, feeds, tokens, None, threads=1, on_hessian=lambda x, h: hs.setdefault(x, h),
                         final_outputs=["out"])
    full = session(m)
    for f, got in zip(feeds, res.outputs):
        np.testing.assert_allclose(got["out"], full.run(["out"], f)[0], rtol=1e-5, atol=1e-5)
    ref = one_pass_hessians(m, ["x0", "r1", "z"], feeds, tokens)
    for x in ref:
        assert_close_h(hs[x], ref[x])
    # substitution: stage j sees the model whose earlier stages' weights are the effective ones
    hs, made = {}, {}

    def quantize(t, h):
        made[t.name] = _Perturbed(t.weight, len(made))
        return made[t.name]

    res = run_sequential(m, targets, feeds, tokens, quantize, threads=1,
                         on_hessian=lambda x, h: hs.setdefault(x, h), final_outputs=["out"])
    assert set(res.layers) == {"w1", "w2", "w3", "w4"}
    stage_of = {t.name: k for k, s in enumerate(stages) for t in s.targets}
    for k, s in enumerate(stages):
        earlier = {n: made[n].w for n, j in stage_of.items() if j < k}
        ref = one_pass_hessians(with_weights(m, targets, earlier), [s.x], feeds, tokens)
        assert_close_h(hs[s.x], ref[s.x])
    assert float((hs["z"] - one_pass_hessians(m, ["z"], feeds, tokens)["z"]).abs().max()) > 1e-3
    # w4 (stage 0, in the last segment) is substituted there too: the output is the fully substituted model's
    all_q = session(with_weights(m, targets, {n: l.w for n, l in made.items()}))
    for f, got in zip(feeds, res.outputs):
        np.testing.assert_allclose(got["out"], all_q.run(["out"], f)[0], rtol=1e-5, atol=1e-4)
    # group=2: stages 0 and 1 both see the fp32 model, stage 2 the model with both quantized
    hs, made = {}, {}
    res = run_sequential(m, targets, feeds, tokens, quantize, threads=1, group=2,
                         on_hessian=lambda x, h: hs.setdefault(x, h), final_outputs=["out"])
    for k, s in enumerate(stages):
        earlier = {n: made[n].w for n, j in stage_of.items() if j < 2 * (k // 2)}
        ref = one_pass_hessians(with_weights(m, targets, earlier), [s.x], feeds, tokens)
        assert_close_h(hs[s.x], ref[s.x])
    all_q = session(with_weights(m, targets, {n: l.w for n, l in made.items()}))
    for f, got in zip(feeds, res.outputs):
        np.testing.assert_allclose(got["out"], all_q.run(["out"], f)[0], rtol=1e-5, atol=1e-4)


def test_effective_initializer_dtypes():
    m = _generic_model()
    targets, _ = find_targets(m)
    w = np.arange(128, dtype=np.float32).reshape(8, 16)
    gemm = next(t for t in targets if t.node.op_type == "Gemm")
    assert numpy_helper.to_array(effective_initializer(m, gemm, w, "e")).shape == (8, 16)   # transB: W
    mm = targets[0]
    half = onnx.ModelProto()
    half.CopyFrom(m)
    init = next(i for i in half.graph.initializer if i.name == "w1")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), "w1"))
    e = effective_initializer(half, mm, np.ones((16, 8), np.float32), "e")
    assert e.data_type == TensorProto.FLOAT16 and numpy_helper.to_array(e).shape == (8, 16)  # MatMul: W^T


# --- with QuIP on the tiny Llama ------------------------------------------------------------
def _quantizer(cfg):
    caches = {}

    def quantize(t, h):
        inp = LayerInput(t.name, torch.from_numpy(t.weight), None if t.bias is None else torch.from_numpy(t.bias),
                         h, caches.setdefault(t.x, {}))
        return quantize_linear(inp, cfg)
    return quantize


def test_stage_hessian_is_that_of_the_model_with_earlier_layers_quantized(tiny):
    root, folder, text, path = tiny
    src = load_checked(path)
    targets, _ = find_targets(src)
    stages = plan_stages(targets)
    wins = windows()
    hs = {}
    res = run_sequential(src, targets, lm_feeds(src, wins), int(wins.numel()), _quantizer(QuantConfig(bits=2)),
                         threads=1, on_hessian=lambda x, h: hs.setdefault(x, h))
    assert len(res.layers) == 14
    stage_of = {t.name: k for k, s in enumerate(stages) for t in s.targets}
    fp32, _ = collect_hessians(src, path, targets, wins, 1, False)
    for k, s in enumerate(stages):
        earlier = {n: res.layers[n].effective_weight() for n, j in stage_of.items() if j < k}
        explicit = with_weights(src, targets, earlier)
        ref = one_pass_hessians(explicit, [s.x], lm_feeds(src, wins), int(wins.numel()))
        assert_close_h(hs[s.x], ref[s.x], rtol=1e-4)
        if k > 0:  # at 2 bits the earlier layers' rounding shows in every later stage's input
            rel = float((hs[s.x] - fp32[s.x]).abs().max() / fp32[s.x].abs().max())
            assert rel > 1e-3, (s.x, rel)


CAL = dict(windows=6, length=24)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compile_sequential_end_to_end(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from quipc.backends.onnx.inspect import layers_from_onnx, torch_model_with

    root, folder, text, path = tiny
    cal = CalibConfig(text=str(text), **CAL)
    cache = tmp_path / "cache.pt"
    seq = compile_onnx(path, tmp_path / "seq", QuantConfig(bits=2), cal, tokenizer=str(folder), progress=False,
                       accuracy_level=0, threads=1, hessian_cache=cache)
    one = compile_onnx(path, tmp_path / "one", QuantConfig(bits=2), cal, tokenizer=str(folder), progress=False,
                       accuracy_level=0, threads=1, calibration="one-pass")
    assert seq["calibration_mode"].startswith("sequential") and "fp32" in one["calibration_mode"]
    assert seq["quantized_layers"] == one["quantized_layers"] == 14 and seq["bpw"] == one["bpw"]
    assert (tmp_path / "seq" / "tokenizer").is_dir()
    a, b = layers_from_onnx(tmp_path / "seq" / "model.onnx"), layers_from_onnx(tmp_path / "one" / "model.onnx")
    # the first stage (q/k/v of block 0) sees the fp32 model in both modes; every later one does not
    first = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    for name in first:
        assert (a[name].codes == b[name].codes).mean() > 0.97
    later = [n for n in a if n not in first]
    assert np.mean([(a[n].codes != b[n].codes).mean() for n in later]) > 0.05
    # the model runs and computes what its layers compute on the torch path
    x = windows(2, 24, seed=5)
    lm = OnnxLM(tmp_path / "seq", threads=1)
    tmodel = torch_model_with(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), a)
    for w in x:
        got = lm.logits(w)
        with torch.no_grad():
            ref = tmodel(input_ids=w[None]).logits[0].numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert len(lm.generate(x[0, :4], 5)) == 9
    # the cache returns the finished layers for the same settings only
    again = compile_onnx(path, tmp_path / "seq2", QuantConfig(bits=2), cal, tokenizer=str(folder), progress=False,
                         accuracy_level=0, threads=1, hessian_cache=cache)
    assert again["calibration"].get("cached")
    same = {k: v for k, v in _digest(tmp_path / "seq").items() if k != "quipc_onnx.json"}   # (it says cached)
    assert {k: v for k, v in _digest(tmp_path / "seq2").items() if k != "quipc_onnx.json"} == same
    other = compile_onnx(path, tmp_path / "seq3", QuantConfig(bits=3), cal, tokenizer=str(folder), progress=False,
                         accuracy_level=0, threads=1, hessian_cache=cache)
    assert not other["calibration"].get("cached") and other["bits"] == 3


def test_error_midway_leaves_nothing(tiny, tmp_path, monkeypatch):
    import quipc.frontend.onnx_model as om

    root, folder, text, path = tiny
    before = _digest(path.parent)
    calls = []
    real = om.quantize_linear

    def failing(inp, cfg):
        calls.append(inp.name)
        if len(calls) == 6:
            raise RuntimeError("boom")
        return real(inp, cfg)

    monkeypatch.setattr(om, "quantize_linear", failing)
    cache = tmp_path / "cache.pt"
    for out in (tmp_path / "o", tmp_path / "o.onnx"):
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            compile_onnx(path, out, QuantConfig(bits=2), CalibConfig(text=str(text), **CAL), tokenizer=str(folder),
                         progress=False, threads=1, hessian_cache=cache)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and _digest(path.parent) == before
    with pytest.raises(ValueError, match="unknown calibration"):
        compile_onnx(path, tmp_path / "x", QuantConfig(bits=2), CalibConfig(text=str(text), **CAL),
                     tokenizer=str(folder), progress=False, calibration="blockwise")
