"""ONNX backend on a tiny random Llama: fp32 graph vs transformers, quantized export vs the
artifact's torch path (QuipLinearRef), KV-cache generation, checker, std ops."""
import json

import numpy as np
import onnx
import pytest
import torch

from quipc.backends.onnx import export_artifact, export_hf_model
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc_runtime import load
from quipc_runtime.onnx_runtime import OnnxLM
from tiny import make_tiny_llama, write_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    folder = make_tiny_llama(root / "hf")
    text = write_text(root / "calib.txt")
    return root, folder, text


@pytest.fixture(scope="module")
def artifacts(tiny):
    root, folder, text = tiny
    out = {}
    for bits in (2, 3, 4):
        out[bits] = root / f"art{bits}"
        compile_model(str(folder), out[bits], QuantConfig(bits=bits), CalibConfig(text=str(text), windows=8, length=32),
                      progress=False)
    return out


def ids(n=20, seed=0):
    return torch.randint(3, 17, (1, n), generator=torch.Generator().manual_seed(seed))


def check_read_back(path, artifact):
    """layers_from_onnx gives back the artifact's layers (grouped nodes split per layer)."""
    from quipc.backends.onnx.inspect import layers_from_onnx
    from quipc_runtime import artifact as art

    want = art.load_layers(artifact, art.read_manifest(artifact))
    got = layers_from_onnx(path)
    assert sorted(got) == sorted(want)
    for name, layer in want.items():
        for key in ("codes", "scale", "zero", "in_scale", "bias"):
            a, b = getattr(got[name], key), getattr(layer, key)
            assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), (name, key)
        for side in ("t_in", "t_out"):
            np.testing.assert_allclose(getattr(got[name], side).dense(), getattr(layer, side).dense(), atol=1e-6)


def test_fp32_graph_matches_transformers(tiny):
    root, folder, _ = tiny
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    path = export_hf_model(model, root / "fp32")
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits[0].numpy()
    lm = OnnxLM(path, threads=1)
    np.testing.assert_allclose(lm.logits(x), ref, rtol=1e-4, atol=1e-4)
    # KV cache: greedy generation equals transformers' greedy generation
    gen = model.generate(x[:, :5], max_new_tokens=8, do_sample=False, attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert list(lm.generate(x[0, :5], 8)) == list(gen[0].numpy())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("ops", ["quip", "std"])
def test_quantized_export_matches_torch_path(tiny, artifacts, bits, ops):
    root, _, _ = tiny
    out = root / f"onnx{bits}_{ops}"
    path = export_artifact(artifacts[bits], out, ops=ops, progress=False, accuracy_level=0)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    quip_nodes = [n for n in model.graph.node if n.op_type in ("QuipLinear", "QuipLinearGroup")]
    if ops == "quip":   # per block: q/k/v and gate/up grouped, o and down alone
        assert [n.op_type for n in quip_nodes] == ["QuipLinearGroup", "QuipLinear"] * 2 * 2
        assert all(n.domain == "ai.quipc" for n in quip_nodes)
        assert {o.domain for o in model.opset_import} >= {"ai.quipc"}
        check_read_back(path, artifacts[bits])
    else:
        assert not quip_nodes and not model.functions
        assert "Split" in {n.op_type for n in model.graph.node}   # the grouped bodies, inlined
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert (out / "model.onnx.data").is_file() and (out / "tokenizer").is_dir()
    assert json.loads((out / "quipc_onnx.json").read_text())["bits"] == bits
    assert_matches_torch_path(load(artifacts[bits]), OnnxLM(out, threads=1), ids(24, seed=bits))


def assert_matches_torch_path(torch_model, lm, x) -> None:
    """An ONNX export's prefill logits and greedy tokens (KV cache) equal the torch path's."""
    with torch.no_grad():
        ref = torch_model(input_ids=x).logits[0].numpy()
    np.testing.assert_allclose(lm.logits(x), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    gen = torch_model.generate(x[:, :6], max_new_tokens=6, do_sample=False,
                               attention_mask=torch.ones(1, 6, dtype=torch.long))
    got, want = list(lm.generate(x[0, :6], 6)), list(gen[0].numpy())
    assert got[:len(want)] == want and (len(got) == len(want) or want[-1] == 2)   # transformers stops at EOS
    assert lm.tokenizer() is not None


def test_export_refuses_bad_input(tiny, artifacts, tmp_path):
    root, _, _ = tiny
    with pytest.raises(ValueError):
        export_artifact(tmp_path / "nope", tmp_path / "o1", progress=False)
    with pytest.raises(ValueError):
        export_artifact(artifacts[4], tmp_path / "o2", ops="fast", progress=False)
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        export_artifact(artifacts[4], tmp_path / "o3", progress=False)
    assert (tmp_path / "o3" / "x").read_text() == "keep"
