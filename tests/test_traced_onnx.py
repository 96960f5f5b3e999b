"""The traced ONNX lowering (backends/onnx/traced.py) on a tiny random model of every family:
prefill and 8 KV-cache decode steps against the torch path, the C++ kernels runtime beside
it, the quantized linears as quipc nodes, the same bytes twice, clear errors."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import lru_cache
from types import SimpleNamespace

import onnx
import pytest
import torch

from quipc.backends.onnx.traced import export_traced
from quipc_runtime import artifact as art
from traced_families import DECODE_STEPS, FAMILY_CONFIGS, PROMPT_LEN, family_artifact, prompt, rel, \
    torch_reference

TOL = 1e-4


def export(artifact, out, **kw):
    return export_traced(artifact, out, accuracy_level=1, progress=False, **kw)   # fp32 activations: exact


def family_onnx(family: str, head: bool = False):
    """The traced export of the family's artifact (once per session)."""
    return _exported(family, bool(head))


@lru_cache(maxsize=None)
def _exported(family: str, head: bool):
    artifact = family_artifact(family, head)
    return export(artifact, artifact.parent / ("onnx-head" if head else "onnx"))


def onnx_steps(path):
    """(prefill logits (L, V), [decode logits per step], greedy tokens) through OnnxLM."""
    from quipc_runtime.onnx_runtime import OnnxLM

    lm = OnnxLM(path, threads=2)
    ids = prompt().numpy()
    full = lm.logits(ids)
    tokens = lm.generate(ids, DECODE_STEPS).tolist()
    last, past = lm.prefill(ids)
    steps = []
    for k in range(DECODE_STEPS):
        steps.append(last)
        last, past = lm.decode(tokens[PROMPT_LEN + k], past, PROMPT_LEN + k)
    return full, steps, tokens


def check_against_torch(artifact, path):
    want_full, want_steps, want_tokens = torch_reference(artifact)
    full, steps, tokens = onnx_steps(path)
    assert rel(full, want_full) < TOL
    assert max(rel(a, b) for a, b in zip(steps, want_steps)) < TOL
    assert tokens == want_tokens


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_family_traced_onnx_matches_torch(family):
    artifact = family_artifact(family)
    check_against_torch(artifact, family_onnx(family))
    kernels = pytest.importorskip("quipc_runtime.kernels")
    if kernels.available():
        k_full, k_steps, k_tokens = torch_reference(artifact, backend="kernels")
        want_full, _, want_tokens = torch_reference(artifact)
        assert rel(k_full, want_full) < TOL and k_tokens == want_tokens


def test_quantized_head_and_embedding():
    """e8p blocks, 4-bit lm_head whose codes are the embedding (the CLI defaults): the embedding
    is a Gather of code rows, never a dense table."""
    artifact = family_artifact("qwen2", head=True)
    (head,) = art.load_block(artifact, art.read_manifest(artifact)["head"])
    assert head.has_row_patch and len(head.row_ids) == 256 // 8   # its frequent rows at 8 bits
    path = family_onnx("qwen2", head=True)
    check_against_torch(artifact, path)
    model = onnx.load(path, load_external_data=False)
    dense = [i.name for i in model.graph.initializer if list(i.dims) == [256, 64] and i.data_type == 1]
    assert dense == []


def test_scaled_embedding_keeps_its_scale():
    """Gemma 3's embedding module multiplies its rows by sqrt(hidden); the quantized table
    (here the 4-bit head's codes) must too, on the torch path and in the traced graph."""
    from transformers import AutoModelForCausalLM

    import quipc_runtime

    artifact = family_artifact("gemma3", head=True)
    fp = AutoModelForCausalLM.from_pretrained(artifact.parent / "hf", dtype=torch.float32)
    ids = prompt()
    with torch.no_grad():
        want = fp.get_input_embeddings()(ids).numpy()
        got = quipc_runtime.load(artifact).get_input_embeddings()(ids).numpy()
    assert rel(got, want) < 0.25   # 4-bit rows; without the scale the error is 1 - 1/8
    check_against_torch(artifact, family_onnx("gemma3", head=True))


def test_quantized_linears_are_quipc_nodes():

    artifact = family_artifact("llama")
    model = onnx.load(family_onnx("llama"), load_external_data=False)
    ops = Counter((n.domain, n.op_type) for n in model.graph.node)
    assert not [k for k in ops if k[0] == "ai.quipc.traced"]
    names = []
    for n in model.graph.node:
        if n.domain == "ai.quipc":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            names += [s.decode() for s in attrs["layer_names"]] if n.op_type == "QuipLinearGroup" else \
                [n.name.rsplit(".QuipLinear", 1)[0]]
    want = art.load_layers(artifact, art.read_manifest(artifact))
    assert sorted(names) == sorted(want)
    assert ops[("ai.quipc", "QuipLinearGroup")] == 4            # q/k/v and gate/up of 2 blocks
    assert len(model.graph.node) < 300                          # not inlined into thousands of nodes


def _digest(folder) -> str:
    h = hashlib.sha256()
    for name in ("model.onnx", "model.onnx.data"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_export_deterministic_and_cli(tmp_path):
    from quipc.cli import main

    artifact = family_artifact("gemma2")
    first = family_onnx("gemma2").parent
    assert main(["compile", str(artifact), "--target", "onnx", "--graph", "traced", "--no-progress",
                 "--onnx-accuracy-level", "1", "-o", str(tmp_path / "again")]) == 0
    assert _digest(first) == _digest(tmp_path / "again")


def test_graph_choice_and_errors():
    from transformers import AutoConfig

    from quipc.backends.lower import choose_graph
    from quipc.backends.traced import family_for

    assert choose_graph(family_artifact("llama")) == "traced"
    assert choose_graph(family_artifact("llama"), "handwritten", target="tvm") == "handwritten"
    with pytest.raises(ValueError, match="hand-written ONNX graph no longer lowers artifacts.*--graph traced"):
        choose_graph(family_artifact("llama"), "handwritten", target="onnx")
    assert choose_graph(family_artifact("llama"), target="tvm") == "traced"
    assert choose_graph(family_artifact("llama"), target="tvm", tvm_target="cuda") == "handwritten"
    assert choose_graph(family_artifact("qwen2")) == "traced"
    assert choose_graph(family_artifact("qwen2"), target="tvm") == "traced"
    with pytest.raises(ValueError, match="hand-written graphs cover llama.*'qwen2'.*--graph traced"):
        choose_graph(family_artifact("qwen2"), "handwritten", target="tvm")
    with pytest.raises(ValueError, match="no family for model_type 'gpt_neox'"):
        family_for(AutoConfig.for_model("gpt_neox"))
    cfg = AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="llama: .*'dynamic' recomputes the rotary tables"):
        family_for(cfg)


def test_untranslatable_op_is_named(monkeypatch):
    """An op the ONNX exporter has no translation for stops the export with its name (a
    one-layer program: the quipc op left without its translation)."""
    import torch

    from quipc.backends.onnx import traced
    from quipc.backends.traced import FAMILIES
    from quipc_runtime.modules import QuipLinearRef
    from quipc_runtime.torch_ops import QuipOpLinear

    artifact = family_artifact("llama")
    layer = art.load_layers(artifact, art.read_manifest(artifact))["model.layers.0.mlp.up_proj"]
    module = QuipOpLinear("t/up", QuipLinearRef(layer))
    example = (torch.randn(2, 64),)
    program = torch.export.export(module, example)
    captured = SimpleNamespace(program=program, example=example, family=FAMILIES[0])
    monkeypatch.setattr(traced, "translations", lambda: {})
    with pytest.raises(ValueError, match="llama: the ONNX exporter cannot translate.*quip_linear"):
        traced._to_onnx(captured)


def test_cli_compiles_a_model_to_onnx(tmp_path):
    """quipc compile MODEL --target onnx: the artifact in OUT/artifact, the traced graph (auto for
    qwen2) beside it, equal to the artifact's torch path (a grid head: --calib's default trellis
    head decodes on its rows rounded to 8 bits, tests/test_head.py)."""
    from quipc.cli import main

    folder = family_artifact("qwen2").parent / "hf"
    text = family_artifact("qwen2").parent / "calib.txt"
    out = tmp_path / "out"
    assert main(["compile", str(folder), "--target", "onnx", "--bits", "2", "--format", "grid",
                 "--finetune", "none", "--calib", str(text), "--calib-windows", "8", "--calib-len", "32",
                 "--head-format", "grid", "--onnx-accuracy-level", "1", "--no-progress", "-o", str(out)]) == 0
    meta = json.loads((out / "quipc_onnx.json").read_text())
    assert meta["graph"] == "traced" and meta["family"] == "qwen2"
    check_against_torch(out / "artifact", out / "model.onnx")
