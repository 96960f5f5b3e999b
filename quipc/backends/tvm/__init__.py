"""TVM backend: the quantized model lowered to Relax + TIR (QuIP linears as fused
unpack-dequantize-matmul kernels), compiled with apache-tvm for llvm (CPU) or cuda.

    compile_artifact(artifact, out, target="llvm") -> out   (see build.py)
Run it with `quipc_runtime.tvm_runtime.TvmLM(out)` (TVM runtime only)."""
from __future__ import annotations

from pathlib import Path


def compile_artifact(artifact: Path, out: Path, *, target: str = "llvm", progress: bool = True,
                     activations: str = "fp32") -> Path:
    from .build import compile_artifact as _compile

    return _compile(Path(artifact), Path(out), target=target, progress=progress, activations=activations)


__all__ = ["compile_artifact"]
