"""`quipc bench --baseline llamacpp`: which GGUF llama.cpp requantizes, the skip without
llama-cpp-python, and (where it is installed) a real requantize + decode in the interleaved run."""
from __future__ import annotations

import argparse
import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama saved as GGUF (hidden 64: rows of whole 32-value blocks, as Q4_0 / Q8_0 need)."""
    from transformers import AutoModelForCausalLM

    from gguf_writer import write_gguf
    from tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("gguf")
    folder = make_tiny_llama(root / "hf", hidden=64, intermediate=128)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return write_gguf(model, root / "tiny.gguf"), folder


def parse(argv):
    from quipc import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_source_gguf_is_the_artifacts_own_file(tiny_gguf, monkeypatch, tmp_path):
    from quipc.bench_llamacpp import source_gguf
    from quipc.frontend.models import resolve

    path, folder = tiny_gguf
    monkeypatch.chdir(path.parent)
    source = resolve(path.name).describe()            # what a compile of tiny.gguf records
    assert source_gguf(source, None)[0] == path.parent.resolve() / path.name
    with pytest.raises(ValueError, match="sha256 differs"):
        source_gguf({**source, "sha256": "0" * 64}, None)
    with pytest.raises(ValueError, match="does not record its source"):
        source_gguf(None, None)
    monkeypatch.chdir(folder.parent)
    with pytest.raises(ValueError, match="Hugging Face folder, not a GGUF file; pass --gguf"):
        source_gguf(resolve(folder.name).describe(), None)
    # --gguf: taken as given (a GGUF converted from the compiled folder has another sha256)
    assert source_gguf({**source, "sha256": "0" * 64}, str(path))[0] == path
    with pytest.raises(FileNotFoundError, match="no such file"):
        source_gguf(source, str(tmp_path / "missing.gguf"))
    (tmp_path / "fake.gguf").write_bytes(b"ONNX" + bytes(64))
    with pytest.raises(ValueError, match="bad magic"):
        source_gguf(source, str(tmp_path / "fake.gguf"))


def test_baseline_names_and_skip_reason(tiny_artifact, tmp_path, monkeypatch):
    from quipc import bench, bench_llamacpp

    assert parse(["a", "--baseline", "fp32,llamacpp"]).baseline == ["fp32", "llamacpp"]
    with pytest.raises(SystemExit):
        parse(["a", "--baseline", "llama"])
    monkeypatch.setattr(bench_llamacpp, "why_not", lambda: "llama-cpp-python is not installed (test)")
    out = tmp_path / "b.json"
    args = parse([str(tiny_artifact), "--backends", "torch-ref", "--baseline", "llamacpp", "--reps", "1",
                  "--new-tokens", "2", "--prompt-len", "5", "--threads", "1", "--work", str(tmp_path / "w"),
                  "--json", str(out)])
    assert bench.run(args) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["backend"] for r in recs] == ["torch-ref", "llamacpp-q4_0", "llamacpp-q8_0"]
    assert recs[0]["status"] == "ok"
    for r in recs[1:]:
        assert r == {"backend": r["backend"], "status": "skipped", "reason": "llama-cpp-python is not installed (test)"}


def test_llamacpp_requantizes_and_decodes(tiny_gguf, tiny_artifact, tmp_path):
    pytest.importorskip("llama_cpp")
    from quipc import bench
    from quipc.bench_llamacpp import LlamaCppDriver, requantize, source_gguf

    path, _ = tiny_gguf
    digest = source_gguf(None, str(path))[1]
    q8 = requantize(path, digest, "Q8_0", tmp_path, threads=1)
    assert q8.read_bytes()[:4] == b"GGUF" and requantize(path, digest, "Q8_0", tmp_path, threads=1) == q8   # cached
    assert not list(tmp_path.glob("*.partial"))
    # greedy through the driver = greedy through llama.cpp's own sampler
    drv = LlamaCppDriver(str(q8), threads=1, n_ctx=64, n_batch=8)
    tok, _ = drv.prefill([1, 5, 9, 13, 17, 21])
    toks = [tok]
    for pos in range(6, 10):
        tok, _ = drv.decode(tok, pos, None)
        toks.append(tok)
    drv.llm.reset()
    want = []
    for t in drv.llm.generate([1, 5, 9, 13, 17, 21], top_k=1, temp=0.0, reset=True):
        want.append(t)
        if len(want) == len(toks):
            break
    assert toks == want
    out = tmp_path / "b.json"
    args = parse([str(tiny_artifact), "--backends", "llamacpp-q4_0", "--baseline", "llamacpp", "--gguf", str(path),
                  "--reps", "1", "--new-tokens", "3", "--prompt-len", "6", "--threads", "1",
                  "--work", str(tmp_path / "w"), "--json", str(out)])
    assert bench.run(args) == 0
    recs = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert list(recs) == ["llamacpp-q4_0", "llamacpp-q8_0"]
    for name, ftype in (("llamacpp-q4_0", "Q4_0"), ("llamacpp-q8_0", "Q8_0")):
        r = recs[name]
        assert r["status"] == "ok", r
        assert r["bits"] == ftype and r["source_file"] == "tiny.gguf" and r["decode_ms"] > 0
        assert r["file"].endswith(f"-{ftype}.gguf") and r["file_mb"] == round((tmp_path / "w" / r["file"]).stat().st_size / 1e6, 2)
