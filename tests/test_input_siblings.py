"""Siblings (linears reading one tensor) and the tying of their input scales in fine-tuning
(quipc.passes.input_siblings): tied siblings leave fine-tuning with one in_scale, so the ONNX
export runs them as one QuipLinearGroup node; untied ones do not."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import quipc
from quipc.backends.onnx import export_artifact
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.passes.input_siblings import input_siblings, tie_input_scales, unique_parameters
from quipc_runtime import artifact as art

SIBLINGS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_siblings_are_the_linears_reading_one_tensor(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ids = torch.arange(6)[None]
    groups = input_siblings(model, names, lambda: model(input_ids=ids))
    layers = sorted({n.split(".")[2] for n in names if n.startswith("model.layers.")}, key=int)
    want = [[f"model.layers.{i}.{n}" for n in g] for i in layers for g in SIBLINGS] + [["lm_head"]]
    assert groups == want


def test_a_linear_never_called_is_its_own_group():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.unused = (nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    m = Two()
    groups = input_siblings(m, ["unused", "c", "b", "a"], lambda: m(torch.ones(2, 4)))
    assert groups == [["b", "a"], ["c"], ["unused"]]


class _Tunable(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.in_scale = nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_only_equal_scales_are_tied():
    t = {"q": _Tunable([1.0, -1.0]), "k": _Tunable([1.0, -1.0]), "o": _Tunable([1.0, 1.0]),
         "g": _Tunable([2.0, 1.0]), "u": _Tunable([1.0, 2.0])}    # g/u differ (rescaled): left apart
    tied = tie_input_scales(t, [["q", "k"], ["o"], ["g", "u"]])
    assert tied == [["q", "k"]]
    assert t["q"].in_scale is t["k"].in_scale and t["g"].in_scale is not t["u"].in_scale
    params = unique_parameters(p for m in t.values() for p in m.parameters())
    assert len(params) == 4 and params[0] is t["q"].in_scale


@pytest.fixture(scope="module")
def compiled(tiny_model, tmp_path_factory):
    model, text = tiny_model
    root = tmp_path_factory.mktemp("tie")
    calib = CalibConfig(text=str(text), windows=16, length=32)
    out = {}
    for mode in ("e2e", "all"):
        for tie in (False, True):
            out[mode, tie] = root / f"{mode}_{tie}"
            compile_model(str(model), out[mode, tie], QuantConfig(bits=2, seed=1, format="e8p", finetune=mode,
                                                                  finetune_tie_inputs=tie), calib, progress=False)
    return out


def _sibling_scales_equal(folder) -> list[bool]:
    layers = art.load_layers(folder, art.read_manifest(folder))
    out = []
    for name in [n for n in layers if n.endswith("q_proj") or n.endswith("gate_proj")]:
        block = name.rsplit(".", 2)[0]
        group = next(g for g in SIBLINGS if name.endswith(g[0]))
        out.append(all(np.array_equal(layers[name].in_scale, layers[f"{block}.{n}"].in_scale) for n in group[1:]))
    return out


@pytest.mark.parametrize("mode", ["e2e", "all"])
def test_tied_siblings_leave_finetuning_with_one_scale_and_export_as_groups(compiled, mode, tmp_path):
    tied, untied = compiled[mode, True], compiled[mode, False]
    assert _sibling_scales_equal(tied) == [True] * 4        # q/k/v and gate/up of 2 blocks
    assert _sibling_scales_equal(untied) == [False] * 4     # trained apart, they drift apart
    assert art.read_manifest(tied)["finetune"]["tied_input_sets"] == 4
    assert art.read_manifest(tied)["quant_config"]["finetune_tie_inputs"] is True
    for folder, groups in ((tied, 4), (untied, 0)):
        path = export_artifact(folder, tmp_path / folder.name, ops="quip", progress=False, accuracy_level=0)
        ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
        assert ops.count("QuipLinearGroup") == groups
    # the tied model is a complete artifact that trained: its held-out KL went down
    hist = art.read_manifest(tied)["finetune"]["holdout_kl"]
    assert min(hist) < hist[0]
    quipc.load(tied)
