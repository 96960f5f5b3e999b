"""lm_head and embedding quantized by `quipc compile` (quipc/passes/head.py): tied and untied
models, one table for a tied model, both runtime backends, exact size accounting, artifacts
written before these existed."""
import json
import shutil

import numpy as np
import pytest
import torch
from interrupt import compile_killed_at
from safetensors.numpy import load_file

import quipc
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc_runtime import artifact as art
from quipc_runtime import kernels
from quipc_runtime.embedding import head_rows

CALIB = dict(windows=8, length=32)
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory):
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("untied") / "model", tied=False, seed=3)


def reference_model(folder, artifact):
    """The source model with every quantized tensor replaced by what the artifact stores."""
    from transformers import AutoModelForCausalLM

    from quipc_runtime.embedding import EmbeddingTable

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    man = art.read_manifest(artifact)
    layers = art.load_layers(artifact, man)
    if man.get("head"):
        layers.update({l.name: l for l in art.load_block(artifact, man["head"])})
    emb = man.get("embedding") or {}
    embed_w = ref.get_input_embeddings().weight.data.clone()
    if emb.get("kind") == "table":
        embed_w = torch.from_numpy(EmbeddingTable.from_storage(emb, art.load_tensors(artifact, emb)).dequantize())
    elif emb.get("kind") == "dense" and emb.get("bits") == 16:
        embed_w = embed_w.half().float()
    head = layers.pop("lm_head", None)
    if head is not None:
        head_w = torch.from_numpy(head_rows(head, np.arange(head.out_features)) if head.t_out.kind == "identity"
                                  else head.effective_weight()).float()
        if emb.get("kind") == "head":
            embed_w = head_w
    else:
        head_w = ref.get_output_embeddings().weight.data.clone()
    for name, layer in layers.items():
        ref.get_submodule(name).weight.data = torch.from_numpy(layer.effective_weight()).float()
    ref.get_output_embeddings().weight = torch.nn.Parameter(head_w)   # unties
    ref.get_input_embeddings().weight = torch.nn.Parameter(embed_w)
    return ref.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_tied_model_stores_one_table(tied_w3):
    man = art.read_manifest(tied_w3)
    assert man["head"]["tied"] and man["embedding"]["kind"] == "head"
    assert "embedding" not in {f.name.split(".")[0] for f in tied_w3.iterdir()}
    dense = load_file(tied_w3 / "dense.safetensors")
    assert not any("embed" in k or "lm_head" in k for k in dense), sorted(dense)
    head = load_file(tied_w3 / "head.safetensors")
    assert sorted(head) == ["lm_head.codes", "lm_head.in_scale", "lm_head.scale", "lm_head.zero"]
    meta = man["head"]["layers"][0]
    assert meta["bits"] == 4 and meta["out_transform"]["kind"] == "identity"
    assert meta["proxy_loss"] < meta["proxy_loss_rtn"]


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=needs_kernels)])
def test_tied_model_computes_the_stored_tensors(tiny_model, tied_w3, backend):
    model = quipc.load(tied_w3, backend=backend)
    ref = reference_model(tiny_model[0], tied_w3)
    ids = torch.randint(3, 17, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), atol=2e-4, rtol=1e-4)
    out = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)


@needs_kernels
def test_kernels_head_and_gather_match_reference(tied_w3):
    ref, fast = quipc.load(tied_w3), quipc.load(tied_w3, backend="kernels")
    ids = torch.tensor([[0, 5, 63, 5]])
    torch.testing.assert_close(fast.get_input_embeddings()(ids), ref.get_input_embeddings()(ids),
                               rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 7, ref.config.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fast.get_output_embeddings()(x), ref.get_output_embeddings()(x),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("embed_bits", ["8", "4", "16"])
def test_untied_model(untied_model, tmp_path, embed_bits):
    text = tmp_path / "calib.txt"
    from tiny import write_text

    write_text(text)
    out = tmp_path / "a"
    man = compile_model(str(untied_model), out, QuantConfig(bits=2, head_bits=3, embed_bits=embed_bits),
                        CalibConfig(text=str(text), **CALIB), progress=False)
    assert not man["head"]["tied"]
    assert man["head"]["layers"][0]["out_transform"]["kind"] == "hadamard"  # through quantize_linear
    kind = "dense" if embed_bits == "16" else "table"
    assert man["embedding"]["kind"] == kind
    dense = load_file(out / "dense.safetensors")
    assert "lm_head.weight" not in dense
    if kind == "dense":
        assert dense["model.embed_tokens.weight"].dtype == np.float16
    else:
        assert "model.embed_tokens.weight" not in dense
    model = quipc.load(out)
    ref = reference_model(untied_model, out)
    ids = torch.randint(3, 17, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), atol=2e-4, rtol=1e-4)
    if kernels.available():
        torch.testing.assert_close(logits(quipc.load(out, backend="kernels"), ids), logits(ref, ids),
                                   atol=2e-4, rtol=1e-4)


def test_tied_head_dense_embedding_quantized(tiny_model, tmp_path):
    """A tied model whose head stays fp32 while the embedding becomes a table: two tables."""
    model, text = tiny_model
    out = tmp_path / "a"
    compile_model(str(model), out, QuantConfig(bits=2, head_bits=32, embed_bits=8),
                  CalibConfig(text=str(text), **CALIB), progress=False)
    dense = load_file(out / "dense.safetensors")
    assert dense["lm_head.weight"].dtype == np.float32 and "model.embed_tokens.weight" not in dense
    ids = torch.randint(3, 17, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(quipc.load(out), ids), logits(reference_model(model, out), ids),
                               atol=2e-4, rtol=1e-4)


def test_size_accounting_is_exact(tied_w3, tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    from quipc.inspect_artifact import deployment_size, render

    man = art.read_manifest(tied_w3)
    s = man["summary"]
    on_disk = sum(p.stat().st_size for p in tied_w3.rglob("*")
                  if p.is_file() and "tokenizer" not in p.relative_to(tied_w3).parts)
    assert s["total_bytes"] == on_disk == (tied_w3 / "manifest.json").stat().st_size + s["data_bytes"]
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model[0]).parameters())
    assert s["model_params"] == params  # the tied table once
    assert s["bits_per_param"] == round(8 * on_disk / params, 4)
    dep = deployment_size(tied_w3, man)
    assert dep["bytes"] == on_disk and dep["bits_per_param"] == 8 * on_disk / params
    monkeypatch.chdir(tied_w3.parent)  # a relative path (the tokenizer is still left out)
    assert deployment_size(tied_w3.name, man)["bytes"] == on_disk
    head = man["head"]["layers"][0]
    assert head["storage_bits"] == 8 * sum(v.nbytes for v in load_file(tied_w3 / "head.safetensors").values())
    text = render(tied_w3)
    assert f"{on_disk:,} bytes" in text and "one table" in text


def test_manifest_names_no_local_path(tied_w3, tiny_model):
    man = art.read_manifest(tied_w3)
    text = (tied_w3 / "manifest.json").read_text()
    assert str(tiny_model[0].parent) not in text and str(tied_w3.parent) not in text
    assert set(man["source"]) == {"spec", "file", "sha256"} and len(man["source"]["sha256"]) == 64
    assert man["calibration"]["source"] == "calib.txt" and len(man["calibration"]["sha256"]) == 64


def test_artifacts_from_before_load(tiny_model, tmp_path):
    """An artifact written the old way (no head / embedding records, source by folder, the old
    config and summary) still loads, tied, and computes what the new dense form does."""
    model, text = tiny_model
    new = tmp_path / "new"
    compile_model(str(model), new, QuantConfig(bits=3, seed=1, head_bits=32, embed_bits=32),
                  CalibConfig(text=str(text), **CALIB), progress=False)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    path = old / "manifest.json"
    man = json.loads(path.read_text())
    assert "head" not in man and "embedding" not in man
    man["source"] = {"spec": str(model), "folder": str(model), "gguf_file": None}
    man["calibration"] = {"source": str(text), "windows": 8, "length": 32}
    for key in ("head_bits", "embed_bits"):
        man["quant_config"].pop(key)
    for key in ("model_params", "data_bytes", "total_bytes", "bits_per_param", "pad"):
        man["summary"].pop(key, None)
    path.write_text(json.dumps(man, indent=1))
    ids = torch.randint(3, 17, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = quipc.load(old), quipc.load(new)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied as before
    torch.testing.assert_close(logits(a, ids), logits(b, ids))
    from quipc.inspect_artifact import render

    assert "lm_head dense; embedding dense" in render(old)


def test_bad_settings_are_refused(tiny_model, untied_model, tmp_path):
    model, text = tiny_model
    calib = CalibConfig(text=str(text), **CALIB)
    with pytest.raises(ValueError, match="head bits"):
        QuantConfig(head_bits=5).validate()
    with pytest.raises(ValueError, match="embed bits"):
        QuantConfig(embed_bits="2").validate()
    with pytest.raises(ValueError, match="tied"):
        compile_model(str(untied_model), tmp_path / "a", QuantConfig(head_bits=4, embed_bits="head"), calib,
                      progress=False)
    with pytest.raises(ValueError, match="quantized lm_head"):
        compile_model(str(model), tmp_path / "b", QuantConfig(head_bits=32, embed_bits="head"), calib,
                      progress=False)


def test_missing_head_file_is_refused(tied_w3, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(tied_w3, copy)
    data = bytearray((copy / "head.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(art.ArtifactError, match="corrupted"):
        quipc.load(copy)
    (copy / "head.safetensors").unlink()
    with pytest.raises(art.ArtifactError, match="missing"):
        quipc.load(copy)


def _artifact_for(tiny_model, tied_w3, tmp_path, head_bits, embed_bits, head_format="grid"):
    """The shared w3 artifact for the default head setting, else a w2 one compiled here."""
    if (head_bits, embed_bits, head_format) == (4, "auto", "grid"):
        return tied_w3
    model, text = tiny_model
    artifact = tmp_path / "a"
    compile_model(str(model), artifact, QuantConfig(bits=2, seed=2, head_bits=head_bits, embed_bits=embed_bits,
                                                    head_format=head_format),
                  CalibConfig(text=str(text), **CALIB), progress=False)
    if head_bits != 32:
        assert art.read_manifest(artifact)["head"]["layers"][0]["format"] == head_format
    return artifact


@pytest.mark.parametrize("head_format", ["e8p", "trellis"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=needs_kernels)])
def test_head_formats_compute_the_stored_tensors(tiny_model, tied_w3, tmp_path, head_format, backend):
    """A tied head (and so the embedding) in a vector / trellis format, on the torch paths."""
    artifact = _artifact_for(tiny_model, tied_w3, tmp_path, 4, "auto", head_format)
    ids = torch.randint(3, 17, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = reference_model(tiny_model[0], artifact)
    torch.testing.assert_close(logits(quipc.load(artifact, backend=backend), ids), logits(ref, ids),
                               atol=2e-4, rtol=1e-4)


@needs_kernels
def test_trellis_head_decodes_on_its_rows_rounded_to_8_bits(tiny_model, tied_w3, tmp_path):
    """trellis_as_int8="head": the kernels runtime runs a trellis lm_head's GEMV on the 8-bit copy of
    its rows (not the blocks'); trellis_as_int8=False keeps the exact one. A decode step's logits against the
    torch path: within the rounding, and exact without it."""
    from quipc_runtime.kernels import KernelQuipLinear

    artifact = _artifact_for(tiny_model, tied_w3, tmp_path, 4, "auto", "trellis")
    fast = quipc.load(artifact, backend="kernels", trellis_as_int8="head")
    exact = quipc.load(artifact, backend="kernels", trellis_as_int8=False)
    assert fast.lm_head._plan.gemv_on_int8_rows and not exact.lm_head._plan.gemv_on_int8_rows
    assert not any(m._plan.gemv_on_int8_rows for m in fast.model.modules() if isinstance(m, KernelQuipLinear))
    ids = torch.randint(3, 17, (1, 1), generator=torch.Generator().manual_seed(0))
    want = logits(quipc.load(artifact), ids)
    torch.testing.assert_close(logits(exact, ids), want, atol=2e-4, rtol=1e-4)
    got = logits(fast, ids)
    assert not torch.allclose(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)


def test_interrupted_head_resumes_to_the_same_bytes(tiny_model, tied_w3, tmp_path, monkeypatch):
    """Killed while quantizing lm_head (every block written): --resume finishes the head and
    writes what an uninterrupted compile writes."""
    from quipc.passes import head as headpass

    model, text = tiny_model
    cfg, calib = QuantConfig(bits=3, seed=1, head_bits=4), CalibConfig(text=str(text), **CALIB)
    cut = compile_killed_at(monkeypatch, headpass, "quantize_head", (str(model), tmp_path / "cut", cfg, calib),
                            dict(progress=False))
    assert not cut["complete"]
    compile_model(str(model), tmp_path / "cut", cfg, calib, resume=True, progress=False)
    for name in ("head.safetensors", "dense.safetensors", "blocks/block_0001.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (tied_w3 / name).read_bytes()


def test_cli_flags():
    from quipc.cli import build_parser
    from quipc.compile_command import head_format
    from quipc.config import CLI_EMBED_BITS, CLI_HEAD_BITS, CLI_HEAD_FORMAT, CLI_HEAD_INT8_ROWS

    args = build_parser().parse_args(["compile", "m", "-o", "x"])
    assert (args.head_bits, args.embed_bits, head_format(args), args.head_int8_rows) == \
        (CLI_HEAD_BITS, CLI_EMBED_BITS, CLI_HEAD_FORMAT, CLI_HEAD_INT8_ROWS)
    args = build_parser().parse_args(["compile", "m", "-o", "x", "--head-int8-rows", "4096"])
    assert QuantConfig(head_bits=4, head_int8_rows=args.head_int8_rows).validate().head_int8_rows == 4096
    with pytest.raises(ValueError, match="head int8 rows"):
        QuantConfig(head_bits=4, head_int8_rows=-1).validate()
    with pytest.raises(ValueError, match="head int8 rows keep rows of a quantized lm_head"):
        QuantConfig(head_bits=32, head_int8_rows=4096).validate()
    args = build_parser().parse_args(["compile", "m", "-o", "x", "--head-format", "trellis"])
    assert QuantConfig(head_bits=args.head_bits, head_format=args.head_format).validate().head_format == "trellis"
    with pytest.raises(ValueError, match="unknown code format"):
        QuantConfig(head_bits=4, head_format="bogus").validate()
    args = build_parser().parse_args(["compile", "m", "-o", "x", "--head-bits", "32", "--embed-bits", "32"])
    assert QuantConfig(head_bits=args.head_bits, embed_bits=args.embed_bits).validate().head_bits == 32
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "m", "-o", "x", "--embed-bits", "3"])


def test_resume_key_of_compiles_from_before_head_format():
    """A compile started before --head-format / --head-int8-rows / --finetune-lr existed (its key hashed none)
    resumes under the default grid head without 8-bit rows; another head format, or rows kept
    at 8 bits, is another job."""
    import hashlib
    from dataclasses import asdict

    from quipc.compile import _job_key

    calib, source = CalibConfig(text="t.txt", **CALIB), {"spec": "m"}
    old = QuantConfig(bits=2, head_bits=4).to_dict()
    del old["head_format"], old["head_int8_rows"], old["finetune_step_windows"], old["finetune_lr"], old["head_refit_damp"]
    del old["finetune_tie_inputs"]
    calib_d = asdict(calib)
    del calib_d["chat"]
    blob = json.dumps({"source": source, "quant": old, "calib": calib_d}, sort_keys=True)
    assert _job_key(source, QuantConfig(bits=2, head_bits=4), calib) == hashlib.sha256(blob.encode()).hexdigest()
    assert _job_key(source, QuantConfig(bits=2, head_bits=4, head_format="trellis"), calib) != \
        _job_key(source, QuantConfig(bits=2, head_bits=4), calib)
    assert _job_key(source, QuantConfig(bits=2, head_bits=4, finetune_tie_inputs=True), calib) != \
        _job_key(source, QuantConfig(bits=2, head_bits=4), calib)   # tied scales: another job
    assert _job_key(source, QuantConfig(bits=2, head_bits=4, head_int8_rows=4096), calib) != \
        _job_key(source, QuantConfig(bits=2, head_bits=4), calib)
    assert _job_key(source, QuantConfig(bits=2, head_bits=4, finetune_step_windows=2), calib) != \
        _job_key(source, QuantConfig(bits=2, head_bits=4), calib)
    assert _job_key(source, QuantConfig(bits=2, head_bits=4, finetune_lr=1e-4), calib) != \
        _job_key(source, QuantConfig(bits=2, head_bits=4), calib)
