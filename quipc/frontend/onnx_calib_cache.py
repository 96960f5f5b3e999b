"""The ONNX frontend's calibration cache: Hessians (or rounded layers) of a model kept on
disk, keyed by everything they depend on, written atomically."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import torch

_CACHE_FORMAT = 2
_CODE = ("quipc/passes", "quipc/frontend/onnx_model.py", "quipc/frontend/onnx_targets.py",
         "quipc/frontend/onnx_rewrite.py", "quipc/frontend/onnx_calibration.py",
         "quipc/frontend/onnx_sequential.py", "quipc/frontend/onnx_segments.py",
         "quipc/frontend/calibration.py", "runtime/quipc_runtime/layer.py", "runtime/quipc_runtime/packing.py",
         "runtime/quipc_runtime/transforms.py", "runtime/quipc_runtime/hadamard.py",
         "runtime/quipc_runtime/onnx_runtime.py")


def calib_key(model_path: Path, calib, settings: str, tokenizer: str | None, kind: str) -> str:
    """Everything a cached result depends on: the model's files, the calibration text and
    tokenizer, the settings it depends on, the code and the library versions."""
    import onnxruntime

    def stat(p: Path) -> str:
        p = Path(p)
        if p.is_dir():
            return "|".join(stat(q) for q in sorted(p.rglob("*")) if q.is_file())
        if not p.exists():
            return f"{p}:missing"
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    raw = onnx.load(str(model_path), load_external_data=False)
    data = sorted({e.value for i in raw.graph.initializer for e in i.external_data if e.key == "location"})
    parts = [kind, str(_CACHE_FORMAT), stat(model_path), *(stat(model_path.parent / d) for d in data),
             str(calib.text), str(calib.windows), str(calib.length)]
    if calib.text is not None:
        parts.append(stat(Path(calib.text)))
        spec = tokenizer if tokenizer else str(model_path.parent / "tokenizer")
        parts += [str(tokenizer), stat(Path(spec)) if Path(spec).exists() else spec]
    parts.append(settings)
    root = Path(__file__).resolve().parents[2]
    code = hashlib.sha256()
    for rel in _CODE:
        p = root / rel
        for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p]):
            if f.is_file():
                code.update(f.read_bytes())
    parts += [code.hexdigest(), onnxruntime.__version__, torch.__version__, np.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_cache(path: Path | None, key: str | None) -> dict | None:
    if path is None or key is None or not Path(path).is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except Exception:  # unreadable or another format: recompute (and overwrite it)
        return None
    return blob if isinstance(blob, dict) and blob.get("key") == key else None


def write_cache(path: Path | None, blob: dict) -> None:
    """Atomically: a half-written cache file is never left behind."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
