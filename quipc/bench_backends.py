"""The backends `quipc bench` knows: their names, why one cannot run here, what one needs built."""
from __future__ import annotations

import time
from pathlib import Path

from . import bench_llamacpp

QUIPC_BACKENDS = ("torch-ref", "runtime", "onnx", "tvm")
# onnx / tvm lower with the artifact's default graph (backends/lower.py: hand-written for llama,
# traced otherwise); these name the graph, to put both side by side (not in the default list)
GRAPH_BACKENDS = {"onnx-traced": ("onnx", "traced"), "tvm-traced": ("tvm", "traced"),
                  "tvm-handwritten": ("tvm", "handwritten")}
# runtime decodes through quipc_runtime's lean decoder where it runs the family (kernels_lm);
# this names the same kernels model driven by transformers' own forward and cache instead
RUNTIME_BACKENDS = ("runtime", "runtime-transformers")
# --baseline NAME adds these backends: the unquantized model, or llama.cpp's own quantized files
BASELINES = {"fp32": ("fp32-torch", "fp32-onnx"), "llamacpp": tuple(bench_llamacpp.LLAMACPP_TYPES)}
BASELINE_BACKENDS = tuple(b for names in BASELINES.values() for b in names)
# every name --backends takes
KNOWN_BACKENDS = QUIPC_BACKENDS + RUNTIME_BACKENDS[1:] + tuple(GRAPH_BACKENDS) + BASELINE_BACKENDS


def why_not(name: str) -> str | None:
    """The reason a backend cannot run here, or None."""
    import importlib.util

    if name in ("onnx", "fp32-onnx") or name.startswith("onnx-"):
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if importlib.util.find_spec("onnx") is None:
            return "onnx is not installed"
    if (name == "tvm" or name.startswith("tvm-")) and importlib.util.find_spec("tvm") is None:
        return "apache-tvm is not installed"
    if name in bench_llamacpp.LLAMACPP_TYPES:
        return bench_llamacpp.why_not()
    if name in RUNTIME_BACKENDS:
        try:
            from quipc_runtime import kernels
        except ImportError as e:
            return f"quipc_runtime.kernels is not importable: {e}"
        if not kernels.available():
            return f"the C++ kernels are not built ({kernels._IMPORT_ERROR})"
    return None


def prepare(name: str, spec: dict, args, work: Path, log) -> str | None:
    """Build what a backend needs (ONNX export, TVM compile, llama.cpp requantization), cached in `work`."""
    art = Path(spec["artifact"])
    try:
        if name in ("onnx", "tvm") or name in GRAPH_BACKENDS:
            target, graph = GRAPH_BACKENDS.get(name, (name, "auto"))
            given = {"onnx": args.onnx_build, "tvm": args.tvm_build}.get(name)
            path = Path(given) if given else work / {"onnx": "onnx-quip", "tvm": "tvm-llvm"}.get(name, name)
            done = path / ("model.onnx" if target == "onnx" else "tvm_config.json")
            if not done.is_file():
                from quipc.backends.lower import lower_artifact

                log(f"lowering {art} to {target} ({graph} graph, {path})")
                t0 = time.time()
                lower_artifact(art, path, target=target, graph=graph, onnx_ops="quip", progress=False)
                spec["build_s"] = round(time.time() - t0, 1)
            spec["onnx_path" if target == "onnx" else "tvm_path"] = str(path)
        elif name in bench_llamacpp.LLAMACPP_TYPES:
            src, digest = bench_llamacpp.source_gguf(spec["source"], args.gguf)
            ftype = bench_llamacpp.LLAMACPP_TYPES[name]
            log(f"{name}: {src.name} requantized to {ftype} by llama.cpp")
            path = bench_llamacpp.requantize(src, digest, ftype, work, spec["threads"])
            spec.update(gguf_path=str(path), file=path.name, source_file=src.name,
                        file_mb=round(path.stat().st_size / 1e6, 2))
        elif name == "fp32-onnx":
            path = work / "onnx-fp32"
            if not (path / "model.onnx").is_file():
                from quipc.backends.onnx.export import export_hf_model
                from quipc.frontend.hf import load_model
                from quipc.frontend.models import resolve

                log(f"exporting the fp32 model to ONNX ({path})")
                model, tok = load_model(resolve(spec["source_spec"]))
                export_hf_model(model.eval(), path, tokenizer=tok)
            spec["onnx_path"] = str(path)
    except Exception as e:
        return f"could not prepare: {type(e).__name__}: {e}"[:500]
    return None
