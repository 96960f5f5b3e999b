"""`quipc bench`: records per backend, skipped backends say why, JSON and chart are written."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest


def parse(argv):
    from quipc import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_records_and_skips(tiny_artifact, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tvm")
    from quipc import bench

    real = bench._why_not
    monkeypatch.setattr(bench, "_why_not",
                        lambda name: "onnxruntime is not installed (test)" if name == "onnx" else real(name))
    out = tmp_path / "b.json"
    args = parse([str(tiny_artifact), "--backends", "torch-ref,onnx,tvm", "--reps", "2", "--new-tokens", "3",
                  "--prompt-len", "9", "--threads", "1", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert bench.run(args) == 0
    data = json.loads(out.read_text())
    recs = {r["backend"]: r for r in data["records"]}
    assert list(recs) == ["torch-ref", "onnx", "tvm"]
    assert recs["onnx"] == {"backend": "onnx", "status": "skipped", "reason": "onnxruntime is not installed (test)"}
    for name in ("torch-ref", "tvm"):
        r = recs[name]
        assert r["status"] == "ok", r
        for key in ("backend", "bits", "threads", "prefill_ms", "decode_ms", "tok_s", "peak_mb", "reps", "spread"):
            assert key in r
        assert r["bits"] == 3 and r["threads"] == 1 and r["reps"] == 2
        lo, hi = r["spread"]["decode_ms"]
        assert lo <= r["decode_ms"] <= hi and r["tok_s"] == pytest.approx(1e3 / r["decode_ms"], rel=1e-2)
        assert r["peak_mb"] > 0
    assert data["meta"]["threads"] == 1 and data["meta"]["reps"] == 2
    table = capsys.readouterr().out
    assert "threads=1" in table and "reps=2" in table and "skipped: onnxruntime is not installed" in table
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 1000



def test_bench_survives_workers_that_die(tiny_artifact, tmp_path, monkeypatch):
    """A backend's process that dies (a native library's crash) while loading is skipped, one that
    dies in a repetition fails, each saying so, and the run ends instead of waiting on it."""
    import threading

    from bench_dying_worker import dying_worker

    from quipc import bench

    monkeypatch.setattr(bench, "worker", dying_worker)
    out = tmp_path / "b.json"
    args = parse([str(tiny_artifact), "--backends", "torch-ref,runtime", "--reps", "1", "--new-tokens", "1",
                  "--prompt-len", "4", "--threads", "1", "--work", str(tmp_path / "work"), "--json", str(out)])
    done = []
    t = threading.Thread(target=lambda: done.append(bench.run(args)), daemon=True)
    t.start()
    t.join(120)
    assert done, "quipc bench waited on a dead worker"
    recs = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert recs["torch-ref"]["status"] == "skipped" and "died while loading (exit code 3)" in recs["torch-ref"]["reason"]
    assert recs["runtime"]["status"] == "failed" and "died in a repetition (exit code 4)" in recs["runtime"]["reason"]
    assert "llama.cpp" not in recs["runtime"]["reason"]
    assert "without AMX" in bench.died("llamacpp-q4_0", -11, "in a repetition")
    assert "without AMX" not in bench.died("llamacpp-q4_0", 1, "in a repetition")

def test_bench_bad_input(tmp_path, tiny_artifact):
    from quipc_runtime.artifact import ArtifactError

    from quipc import bench

    with pytest.raises(ArtifactError):
        bench.run(parse([str(tmp_path)]))
    with pytest.raises(ValueError, match="unknown backend"):
        bench.run(parse([str(tiny_artifact), "--backends", "torch-ref,gpu-magic"]))


def test_no_benchmark_script_hides_an_installed_package():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like an
    installed package replaces it for every import (benchmarks/kernels.py hid the `kernels`
    package that transformers imports, and every script that loaded a model failed)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        clash = [f.stem for f in root.glob("*.py")
                 if f.stem not in sys.modules and importlib.util.find_spec(f.stem) is not None]
    finally:
        sys.path[:] = saved
    assert not clash, f"benchmarks/ scripts named like installed packages: {clash}"
