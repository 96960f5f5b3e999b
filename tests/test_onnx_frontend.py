"""ONNX frontend on a tiny random Llama exported to ONNX: QuIP from an .onnx input."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quipc.backends.onnx.inspect import layers_from_onnx
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.frontend.onnx_model import compile_onnx
from quipc_runtime import load
from quipc_runtime.artifact import load_layers, read_manifest
from quipc_runtime.onnx_runtime import OnnxLM
from tiny import make_tiny_onnx_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_onnx_lm(tmp_path_factory.mktemp("onnxfe"))


CAL = dict(windows=8, length=32)


def ids(n=20, seed=0):
    return torch.randint(3, 17, (1, n), generator=torch.Generator().manual_seed(seed))


def test_rtn_matches_torch_path(tiny):
    """RTN needs no calibration: the ONNX frontend must give exactly the torch path's model."""
    root, folder, text, path = tiny
    art = root / "art_rtn"
    compile_model(str(folder), art, QuantConfig(method="rtn", bits=4), CalibConfig(**CAL), progress=False)
    out = root / "rtn.onnx"
    summary = compile_onnx(path, out, QuantConfig(method="rtn", bits=4), CalibConfig(**CAL), tokenizer=None,
                           progress=False, accuracy_level=0)
    assert summary["quantized_layers"] == 14 and any("lm_head" in s for s in summary["skipped"])
    assert (root / "rtn.onnx.data").is_file()
    x = ids()
    with torch.no_grad():
        ref = load(art)(input_ids=x).logits[0].numpy()
    np.testing.assert_allclose(OnnxLM(out, threads=1).logits(x), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("bits", [2, 3])
def test_quip_from_onnx(tiny, bits):
    root, folder, text, path = tiny
    out = root / f"quip{bits}"
    summary = compile_onnx(path, out, QuantConfig(bits=bits), CalibConfig(text=str(text), **CAL),
                           tokenizer=str(folder), progress=False, accuracy_level=0)
    assert summary["quantized_layers"] == 14
    assert bits < summary["bpw"] < bits + 1.5  # tiny rows: scales weigh a lot
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node if n.domain == "ai.quipc"]
    # per block: q/k/v and gate/up grouped (they read the same tensor), o and down alone
    assert ops.count("QuipLinearGroup") == 4 and ops.count("QuipLinear") == 4
    assert sorted(layers_from_onnx(out / "model.onnx")) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert not any(n.op_type == "MatMul" and "q_proj" in n.input[1] for n in m.graph.node)
    # q/k/v of block 0 see fp32 inputs in both frontends: same Hessian, same codes as the torch
    # path (its later layers differ: the ONNX frontend's sequential calibration cuts before
    # every distinct input, so gate/up see the quantized attention; the torch path cuts per block)
    art = root / f"art{bits}"
    compile_model(str(folder), art, QuantConfig(bits=bits), CalibConfig(text=str(text), **CAL), progress=False)
    layers = load_layers(art, read_manifest(art))
    full = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in full.graph.initializer}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        mine = numpy_helper.to_array(inits[f"{name}.codes"])
        assert (mine == layers[name].codes).mean() > 0.97
    # the quantized model works and differs from fp32 only moderately
    lm, fp = OnnxLM(out, threads=1), OnnxLM(path, threads=1)
    x = ids(24)
    a, r = lm.logits(x), fp.logits(x)
    assert np.isfinite(a).all() and np.abs(a - r).max() > 1e-4
    assert np.corrcoef(a.ravel(), r.ravel())[0, 1] > 0.5
    assert len(lm.generate(x[0, :4], 5)) == 9


def test_token_id_files_and_std(tiny, tmp_path):
    root, folder, text, path = tiny
    toks = np.random.default_rng(0).integers(3, 17, 400)
    np.save(tmp_path / "c.npy", toks)
    (tmp_path / "c.ids").write_text(" ".join(map(str, toks)))
    a = compile_onnx(path, tmp_path / "a.onnx", QuantConfig(bits=4), CalibConfig(text=str(tmp_path / "c.npy"), **CAL),
                     tokenizer=None, progress=False, accuracy_level=0)
    b = compile_onnx(path, tmp_path / "b", QuantConfig(bits=4), CalibConfig(text=str(tmp_path / "c.ids"), **CAL),
                     tokenizer=None, ops="std", progress=False)
    assert a["bpw"] == b["bpw"]
    m = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"} and not m.functions
    x = ids()
    np.testing.assert_allclose(OnnxLM(tmp_path / "a.onnx", threads=1).logits(x),
                               OnnxLM(tmp_path / "b", threads=1).logits(x), rtol=1e-3, atol=1e-3)


def _digest(folder):
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_model(path, opset=21, weight_const=True, matmul=True):
    from onnx import TensorProto, helper
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul" if matmul else "Add", ["x", "w"] if matmul else ["x", "x"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    if not weight_const:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4]))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4] if matmul else [2, 8])],
                          [w] if weight_const else [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_bad_inputs_are_refused_and_untouched(tiny, tmp_path):
    root, folder, text, path = tiny
    before = _digest(path.parent)
    q, c = QuantConfig(bits=2), CalibConfig(text=str(text), **CAL)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.onnx").write_text("hello, not a protobuf")
    with pytest.raises(ValueError, match="not a readable ONNX|no nodes"):
        compile_onnx(bad / "text.onnx", tmp_path / "o1", q, c, tokenizer=str(folder), progress=False)
    raw = path.read_bytes()
    (bad / "trunc.onnx").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError):
        compile_onnx(bad / "trunc.onnx", tmp_path / "o2", q, c, tokenizer=str(folder), progress=False)
    (bad / "nodata.onnx").write_bytes(raw)   # external data file not copied
    with pytest.raises(FileNotFoundError, match="external data"):
        compile_onnx(bad / "nodata.onnx", tmp_path / "o3", q, c, tokenizer=str(folder), progress=False)
    with pytest.raises(ValueError, match="opset 11"):
        compile_onnx(_small_model(bad / "old.onnx", opset=11), tmp_path / "o4", q, c, tokenizer=str(folder),
                     progress=False)
    with pytest.raises(ValueError, match="not constant"):
        compile_onnx(_small_model(bad / "dyn.onnx", weight_const=False), tmp_path / "o5", q, c,
                     tokenizer=str(folder), progress=False)
    with pytest.raises(ValueError, match="nothing to quantize"):
        compile_onnx(_small_model(bad / "add.onnx", matmul=False), tmp_path / "o6", q, c, tokenizer=str(folder),
                     progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        compile_onnx(path, tmp_path / "o7", q, c, tokenizer=None, progress=False)
    with pytest.raises(FileNotFoundError):
        compile_onnx(tmp_path / "missing.onnx", tmp_path / "o8", q, c, tokenizer=None, progress=False)
    with pytest.raises(ValueError, match="token ids"):
        np.save(tmp_path / "big.npy", np.full(600, 10 ** 6))
        compile_onnx(path, tmp_path / "o9", q, CalibConfig(text=str(tmp_path / "big.npy"), **CAL), tokenizer=None,
                     progress=False)
    with pytest.raises(FileExistsError):
        compile_onnx(path, path, q, c, tokenizer=str(folder), progress=False)
    assert _digest(path.parent) == before
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 10))


def test_layers_read_back_run_on_torch_path(tiny):
    """The QuipLinear initializers read back into QuantizedLinear give the same model on torch."""
    from transformers import AutoModelForCausalLM

    from quipc.backends.onnx.inspect import layers_from_onnx, torch_model_with
    root, folder, text, path = tiny
    out = root / "quip3"
    if not out.exists():
        compile_onnx(path, out, QuantConfig(bits=3), CalibConfig(text=str(text), **CAL), tokenizer=str(folder),
                     progress=False, accuracy_level=0)
    layers = layers_from_onnx(out / "model.onnx")
    assert len(layers) == 14
    model = torch_model_with(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), layers)
    x = ids(16)
    with torch.no_grad():
        ref = model(input_ids=x).logits[0].numpy()
    np.testing.assert_allclose(OnnxLM(out, threads=1).logits(x), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_data_free_text_is_kept_for_the_next_compile(tiny, tmp_path, monkeypatch):
    """The text an .onnx model writes is kept in the calibration cache: the second compile reads it
    back without generating and writes the same bytes; another seed is another key."""
    from spies import count_calls

    from quipc.frontend import onnx_calibration

    monkeypatch.delenv("QUIPC_NO_CACHE", raising=False)
    monkeypatch.setenv("QUIPC_CACHE_DIR", str(tmp_path / "cache"))
    calls = count_calls(monkeypatch, onnx_calibration, "generated_windows")
    root, folder, text, path = tiny
    cal = CalibConfig(text=None, windows=2, length=16)
    compile_onnx(path, tmp_path / "a", QuantConfig(bits=2, seed=3), cal, tokenizer=None, progress=False)
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "calibration").iterdir())) == 1
    compile_onnx(path, tmp_path / "b", QuantConfig(bits=2, seed=3), cal, tokenizer=None, progress=False)
    assert len(calls) == 1                      # read back, not written again
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    compile_onnx(path, tmp_path / "c", QuantConfig(bits=2, seed=4), cal, tokenizer=None, progress=False)
    assert len(calls) == 2


def test_data_free_calibration_is_seeded(tiny, tmp_path):
    """No --calib: the ONNX model samples its own windows (seeded), so two runs agree."""
    root, folder, text, path = tiny
    cal = CalibConfig(text=None, windows=2, length=16)
    a = compile_onnx(path, tmp_path / "a", QuantConfig(bits=2, seed=3), cal, tokenizer=None, progress=False)
    b = compile_onnx(path, tmp_path / "b", QuantConfig(bits=2, seed=3), cal, tokenizer=None, progress=False)
    assert a["calibration"]["source"].startswith("generated")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
