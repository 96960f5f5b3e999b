"""The compile's head refit (quipc/head_refit_stage.py): lm_head quantized again after the e2e stage
on the fine-tuned model's final hidden states, at its own damping."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from interrupt import compile_killed_at

import quipc
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc_runtime import artifact as art

CALIB = dict(windows=8, length=32)
CFG = QuantConfig(bits=2, seed=3, head_bits=4, finetune="e2e", finetune_epochs=1)


@pytest.fixture(scope="module")
def e2e_and_refit(tiny_model, tmp_path_factory):
    """The same e2e compile without and with the head refit."""
    model, text = tiny_model
    root = tmp_path_factory.mktemp("refit")
    calib = CalibConfig(text=str(text), **CALIB)
    compile_model(str(model), root / "e2e", CFG, calib, progress=False)
    compile_model(str(model), root / "refit", dataclasses.replace(CFG, head_refit_damp=0.1), calib, progress=False)
    return root / "e2e", root / "refit"


def _head(folder):
    return art.load_block(folder, art.read_manifest(folder)["head"])[0]


def _windows(tokenizer, text):
    from quipc.frontend import calibration

    return calibration.text_windows(tokenizer, str(text), CALIB["windows"], CALIB["length"])


def test_refit_is_the_head_quantized_on_the_finetuned_models_final_hidden_states(tiny_model, e2e_and_refit):
    """The refit head equals quantize_head on E[h h^T] of the e2e artifact's last hidden states (after
    the final norm, fp32 embedding in front), computed here from the model's output, at damp 0.1;
    everything but the head is the e2e compile's, byte for byte."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quipc.passes import head as headpass

    model_dir, text = tiny_model
    e2e, refit = e2e_and_refit
    man = art.read_manifest(refit)
    assert man["head"]["file"] == "head_refit.safetensors" and not (refit / "head_ft.safetensors").exists()
    assert man["head_refit"]["damp"] == 0.1 and man["head_refit"]["windows"] == CALIB["windows"]
    assert man["embedding"]["kind"] == "head" and man["complete"]
    old = art.read_manifest(e2e)
    assert [b["sha256"] for b in man["blocks"]] == [b["sha256"] for b in old["blocks"]]
    assert man["dense"]["sha256"] == old["dense"]["sha256"]

    src = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    windows = _windows(AutoTokenizer.from_pretrained(model_dir), text)
    from quipc.calibration_stage import tokens_sha256
    assert tokens_sha256(windows) == man["calibration"]["tokens_sha256"]
    student = quipc.load(e2e)
    student.set_input_embeddings(src.get_input_embeddings())
    with torch.no_grad():
        h = student.model(input_ids=windows, use_cache=False).last_hidden_state
    h = h.reshape(-1, h.shape[-1]).double()
    hessian = h.T @ h / h.shape[0]
    cfg = dataclasses.replace(CFG, head_refit_damp=0.1)
    want = headpass.quantize_head(src, headpass.plan_for(src, cfg), hessian, dataclasses.replace(cfg, damp=0.1))
    got = _head(refit)
    assert np.array_equal(got.codes, want.codes) and np.array_equal(got.scale, want.scale)
    assert not np.array_equal(got.codes, _head(e2e).codes)
    assert man["head_refit"]["proxy_loss"] == pytest.approx(want.info["proxy_loss"])
    from quipc.inspect_artifact import render
    assert "lm_head quantized again after the e2e stage (damp 0.1" in render(refit)
    assert "quantized again" not in render(e2e)
    # the artifact runs, its embedding the refit head's rows
    out = quipc.load(refit)(input_ids=windows[:1, :8]).logits
    assert torch.isfinite(out).all()


def test_interrupted_refit_resumes_to_the_same_bytes(tiny_model, e2e_and_refit, tmp_path, monkeypatch):
    """Killed while refitting (the e2e stage done): --resume runs the refit, not the e2e stage again,
    and writes what the uninterrupted compile wrote; the e2e head is not put back."""
    from quipc import head_refit_stage

    model, text = tiny_model
    _, refit = e2e_and_refit
    cfg, calib = dataclasses.replace(CFG, head_refit_damp=0.1), CalibConfig(text=str(text), **CALIB)
    cut = compile_killed_at(monkeypatch, head_refit_stage, "final_hidden_hessian",
                            (str(model), tmp_path / "cut", cfg, calib), dict(progress=False))
    assert not cut["complete"] and "finetune" in cut and cut["head"]["file"] == "head_ft.safetensors"
    monkeypatch.setattr("quipc.finetune_stage.run_finetune", lambda *a, **k: pytest.fail("e2e ran again"))
    compile_model(str(model), tmp_path / "cut", cfg, calib, resume=True, progress=False)
    for name in ("head_refit.safetensors", "dense_ft.safetensors", "blocks/block_0001_ft.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (refit / name).read_bytes()
    assert not (tmp_path / "cut" / "head_ft.safetensors").exists()


def test_compile_resumed_in_the_e2e_stage_keeps_the_head_it_wrote(tiny_model, e2e_and_refit, tmp_path,
                                                                  monkeypatch):
    """Killed in the e2e stage (every block and the head written): --resume neither takes the head's
    Hessian nor quantizes the head again, and writes what the uninterrupted compile wrote."""
    from quipc import compile as compile_mod
    from quipc import finetune_stage
    from quipc.passes import head as headpass

    model, text = tiny_model
    e2e, _ = e2e_and_refit
    calib = CalibConfig(text=str(text), **CALIB)
    cut = compile_killed_at(monkeypatch, finetune_stage, "run_finetune",
                            (str(model), tmp_path / "cut", CFG, calib), dict(progress=False))
    assert not cut["complete"] and "finetune" not in cut and cut["head"]["file"] == "head.safetensors"
    monkeypatch.setattr(headpass, "quantize_head", lambda *a, **k: pytest.fail("head quantized again"))
    monkeypatch.setattr(compile_mod, "_head_hessian", lambda *a, **k: pytest.fail("head Hessian taken again"))
    compile_model(str(model), tmp_path / "cut", CFG, calib, resume=True, progress=False)
    for name in ("head_ft.safetensors", "dense_ft.safetensors", "blocks/block_0001_ft.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (e2e / name).read_bytes()


def test_refit_settings_are_checked():
    with pytest.raises(ValueError, match="needs --finetune e2e or all"):
        QuantConfig(head_bits=4, head_refit_damp=0.1).validate()
    with pytest.raises(ValueError, match="needs --head-bits 2, 3 or 4"):
        QuantConfig(finetune="e2e", head_refit_damp=0.1).validate()
    with pytest.raises(ValueError, match="head refit damp"):
        QuantConfig(head_bits=4, finetune="e2e", head_refit_damp=-1).validate()
    QuantConfig(head_bits=4, finetune="all", head_refit_damp=0.1).validate()


@pytest.mark.parametrize("argv, expect", [
    ([], 0.1),                                         # data-free, quantized head, e2e / all: by width
    (["--bits", "3"], 0.1),
    (["--bits", "4"], 0.0),                            # measured worse at 4 bits
    (["--calib", "c.txt"], 0.0),                       # with --calib: not measured, off
    (["--head-bits", "32"], 0.0),                      # nothing to refit
    (["--finetune", "block"], 0.0),                    # no e2e stage to refit after
    (["--head-refit-damp", "0"], 0.0),
    (["--head-refit-damp", "0.3", "--calib", "c.txt"], 0.3),
])
def test_cli_default(argv, expect):
    from quipc.cli import build_parser
    from quipc.compile_command import format_and_finetune, head_refit_damp

    args = build_parser().parse_args(["compile", "smollm2-135m", "-o", "x", *argv])
    args.format, args.finetune, _ = format_and_finetune(args)
    assert head_refit_damp(args) == expect


def test_job_key_of_compiles_without_refit_is_unchanged():
    """head_refit_damp 0 stays out of the resume key (a compile keyed before it existed resumes)."""
    import hashlib

    from quipc.compile import _KEYED_SINCE, _job_key

    calib, source = CalibConfig(text="t.txt", **CALIB), {"spec": "m"}
    quant = {k: v for k, v in CFG.to_dict().items() if k != "head_refit_damp"
             and (k not in _KEYED_SINCE or v != _KEYED_SINCE[k])}
    calib_d = dataclasses.asdict(calib)
    del calib_d["chat"]
    blob = json.dumps({"source": source, "quant": quant, "calib": calib_d}, sort_keys=True)
    assert _job_key(source, CFG, calib) == hashlib.sha256(blob.encode()).hexdigest()
    assert _job_key(source, dataclasses.replace(CFG, head_refit_damp=0.1), calib) != _job_key(source, CFG, calib)
