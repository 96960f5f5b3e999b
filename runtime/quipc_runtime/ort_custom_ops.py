"""quipc's onnxruntime custom-op library (built from cpp/ort with the C++ kernels and
installed beside them): ai.quipc QuipLinear / QuipLinearGroup nodes then run as one fused
C++ kernel call each instead of their ONNX function bodies. onnxruntime picks a registered
kernel over a model-local function of the same domain and name: it inlines a function only
for nodes no execution provider claims (GraphPartitioner::InlineFunctionsAOT, before the
graph optimizations, and again during partitioning), and the library's kernel registry makes
the CPU provider claim them. So the same .onnx file runs either way (the tests check with
onnxruntime's profiler which nodes ran).

`library_path()` finds the library; `register(options, threads)` adds it to an
onnxruntime SessionOptions. The library needs onnxruntime >= 1.18 (C API version 18) and
refuses an older runtime with an error naming both versions.
"""
from __future__ import annotations

from pathlib import Path

THREADS_KEY = "quipc.threads"   # session config entry read by the library at registration
LIBRARY_FORMATS = ("grid", "e8p", "trellis", "trellis256")   # code formats the library's kernels run (cpp/ort/custom_ops.cpp)
_NAMES = ("libquipc_ort.so", "libquipc_ort.dylib", "quipc_ort.dll")


def _candidate_dirs() -> list[Path]:
    import importlib.util

    import quipc_runtime

    dirs = [Path(p) for p in quipc_runtime.__path__]
    spec = importlib.util.find_spec("quipc_runtime._kernels")   # editable installs keep it apart
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent)
    return dirs


def library_path() -> Path | None:
    """The custom-op library's path, or None when the package was installed without it."""
    for folder in _candidate_dirs():
        for name in _NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def available() -> bool:
    return library_path() is not None


def formats_in(model_path) -> set[str]:
    """The code formats of a model's ai.quipc nodes (their "format" attribute; absent: grid),
    read without its external data."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    found = set()
    for node in model.graph.node:
        if node.domain == "ai.quipc":
            attr = next((a for a in node.attribute if a.name == "format"), None)
            found.add(attr.s.decode() if attr is not None else "grid")
    return found


def runs(model_path) -> bool:
    """Whether the library's kernels run every quipc node of the model (a model holding
    another format runs its ONNX function bodies instead)."""
    return formats_in(model_path) <= set(LIBRARY_FORMATS)


def register(options, threads: int | None = None) -> Path:
    """Register the library on `options` (onnxruntime.SessionOptions); its kernels split work
    into up to `threads` parts (default: the CPU count) on onnxruntime's intra-op pool.
    Raises RuntimeError when the library is missing or refuses this onnxruntime."""
    path = library_path()
    if path is None:
        raise RuntimeError("quipc's onnxruntime custom-op library is not built (reinstall quipc with "
                           "`bash scripts/setup.sh`), or pass custom_ops=False")
    if threads:
        options.add_session_config_entry(THREADS_KEY, str(int(threads)))
    try:
        options.register_custom_ops_library(str(path))
    except Exception as e:   # onnxruntime raises its own exception types
        raise RuntimeError(f"onnxruntime refused {path.name}: {e}") from None
    return path
