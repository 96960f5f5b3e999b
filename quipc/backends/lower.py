"""Which graph a quipc artifact is lowered with, and the lowering itself (`quipc compile
--target onnx|tvm --graph ...`, `quipc bench`).

    handwritten  the Llama graph written node by node for TVM (tvm/relax_model.py);
                 llama-architecture artifacts only. The hand-written ONNX lowering is retired
                 (stop 41: the traced file decoded as fast; onnx/llama.py remains only as the
                 fp32 reference export).
    traced       the artifact's transformers model captured by torch.export (backends/traced),
                 every family in traced/families.py
    auto         traced, except for llama artifacts lowered to TVM on a GPU target, which keep
                 the hand-written graph (the traced TVM build runs on CPU targets only).
                 On SmolLM2 w2 (`python benchmarks/traced.py`, stop 41) the traced ONNX file
                 decodes at 1.002x the hand-written file's ms per token (paired, with quipc's
                 custom-op library; 0.975x through the function bodies) and the traced TVM build at
                 0.49x the hand-written build's; exports take 49 s and 129 s (hand-written 6 s
                 and 17 s). `--graph handwritten` keeps the hand-written TVM build for comparison.
"""
from __future__ import annotations

from pathlib import Path

GRAPHS = ("auto", "traced", "handwritten")
HANDWRITTEN_TYPES = ("llama",)


def model_type(artifact: Path) -> str | None:
    from quipc_runtime import artifact as art

    return art.read_manifest(Path(artifact)).get("model_config", {}).get("model_type")


def choose_graph(artifact: Path, graph: str = "auto", target: str = "onnx", tvm_target: str = "llvm") -> str:
    if graph not in GRAPHS:
        raise ValueError(f"unknown --graph {graph!r}: expected one of {', '.join(GRAPHS)}")
    kind = model_type(artifact)
    if graph == "auto":
        handwritten = kind in HANDWRITTEN_TYPES and target == "tvm" and _gpu_target(tvm_target)
        return "handwritten" if handwritten else "traced"
    if graph == "handwritten" and target == "onnx":
        raise ValueError("the hand-written ONNX graph no longer lowers artifacts (retired at stop 41, when the "
                         "traced file decoded as fast): use --graph traced (or auto)")
    if graph == "handwritten" and kind not in HANDWRITTEN_TYPES:
        raise ValueError(f"the hand-written graphs cover {', '.join(HANDWRITTEN_TYPES)} artifacts, not "
                         f"{kind!r}: use --graph traced (or auto)")
    return graph


def _gpu_target(tvm_target: str) -> bool:
    from .tvm.build import resolve_target

    return resolve_target(tvm_target).kind.name != "llvm"


def lower_artifact(artifact: Path, out: Path, *, target: str, graph: str = "auto", onnx_ops: str = "quip",
                   accuracy_level: int | None = 4, tvm_target: str = "llvm", progress: bool = True,
                   tvm_e8p: str = "grid4", tvm_activations: str = "int8", tvm_trellis: str = "int8") -> Path:
    """artifact -> OUT (an ONNX folder or a TVM build) with the chosen graph. tvm_activations:
    "int8" (the CLI's default; gemv_i8) or "fp32", for CPU TVM builds."""
    chosen = choose_graph(artifact, graph, target, tvm_target)
    if target == "onnx":
        from .onnx.traced import export_traced

        return export_traced(artifact, out, ops=onnx_ops, progress=progress, accuracy_level=accuracy_level)
    if target == "tvm":
        if chosen == "traced":
            from .tvm.traced import compile_traced

            return compile_traced(artifact, out, target=tvm_target, progress=progress, e8p_kernel=tvm_e8p,
                                  activations=tvm_activations, trellis_kernel=tvm_trellis)
        from .tvm import compile_artifact

        return compile_artifact(artifact, out, target=tvm_target, progress=progress, activations=tvm_activations)
    raise ValueError(f"unknown lowering target {target!r}: expected onnx or tvm")
