"""The quipc artifact: a folder with manifest.json, per-block safetensors of quantized
layers and dense.safetensors for everything kept in floating point.

Every file is written atomically (temporary file + rename) and recorded in the
manifest with its sha256, so an interrupted compile never leaves a torn file and a
tampered or truncated artifact is refused on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load_numpy
from safetensors.numpy import save as st_save_numpy

from .layer import QuantizedLinear, tensors_checksum

FORMAT = "quipc"
FORMAT_VERSION = 2           # 2: layers name their code format (quipc_runtime.formats)
READABLE_VERSIONS = (1, 2)   # version 1 artifacts hold "grid" layers only
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"


class ArtifactError(ValueError):
    """A quipc artifact that is missing, incomplete, tampered with or malformed."""


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_path(folder: Path, rel: str) -> Path:
    """Resolve a manifest-relative path, refusing anything that escapes the folder."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ArtifactError(f"manifest names a path outside the artifact: {rel!r}")
    full = (folder / rel).resolve()
    if folder.resolve() not in full.parents:
        raise ArtifactError(f"manifest names a path outside the artifact: {rel!r}")
    return full


def read_checked(folder: Path, rel: str, sha256: str) -> bytes:
    path = safe_path(folder, rel)
    if not path.is_file():
        raise ArtifactError(f"artifact file {rel} is missing")
    data = path.read_bytes()
    if sha256_bytes(data) != sha256:
        raise ArtifactError(f"artifact file {rel} is corrupted (sha256 mismatch)")
    return data


# --- writing ----------------------------------------------------------------------------
def manifest_bytes(manifest: dict) -> bytes:
    """The manifest exactly as write_manifest stores it."""
    return json.dumps(manifest, indent=1, sort_keys=False).encode()


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(folder / MANIFEST, manifest_bytes(manifest))


def write_block(folder: Path, index: int, layers: list[QuantizedLinear]) -> dict:
    """Write one decoder block's quantized layers; returns its manifest record."""
    return {"index": index, **write_layers(folder, f"blocks/block_{index:04d}.safetensors", layers)}


def write_layers(folder: Path, rel: str, layers: list[QuantizedLinear]) -> dict:
    """Write quantized layers into one file; returns {file, sha256, layers} (read by load_block)."""
    tensors = {}
    for layer in layers:
        for key, arr in layer.tensors().items():
            tensors[f"{layer.name}.{key}"] = np.ascontiguousarray(arr)
    data = st_save_numpy(tensors)
    atomic_write(folder / rel, data)
    metas = [{**layer.meta(), "sha256": layer.checksum()} for layer in layers]
    return {"file": rel, "sha256": sha256_bytes(data), "layers": metas}


def write_tensors(folder: Path, rel: str, tensors: dict[str, np.ndarray]) -> dict:
    """Write numpy tensors into one file; returns {file, sha256} (read by load_tensors)."""
    data = st_save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    atomic_write(folder / rel, data)
    return {"file": rel, "sha256": sha256_bytes(data)}


def load_tensors(folder: str | os.PathLike, record: dict) -> dict[str, np.ndarray]:
    data = read_checked(Path(folder), record["file"], record["sha256"])
    try:
        return st_load_numpy(data)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"artifact file {record['file']} is unreadable: {e}") from None


def data_files(manifest: dict) -> list[str]:
    """Every file the manifest names (tokenizer apart), manifest-relative."""
    recs = manifest.get("blocks", []) + [manifest.get(k) or {} for k in ("dense", "head", "embedding")]
    return [r["file"] for r in recs if r.get("file") is not None]


def write_dense(folder: Path, tensors: dict, rel: str = DENSE_FILE) -> dict:
    """Write the tensors kept in floating point (torch tensors, any dtype)."""
    from safetensors.torch import save as st_save_torch

    data = st_save_torch({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write(folder / rel, data)
    return {"file": rel, "sha256": sha256_bytes(data),
            "tensors": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()}}


# --- reading ----------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike, allow_incomplete: bool = False) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a quipc artifact folder (no such directory)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a quipc artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a quipc manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')} is not "
                            f"supported (this quipc reads versions {READABLE_VERSIONS})")
    if not manifest.get("complete") and not allow_incomplete:
        raise ArtifactError(f"{folder} is an unfinished compile "
                            f"({len(manifest.get('blocks', []))} blocks done): "
                            "rerun `quipc compile ... --resume` to finish it")
    for rel in data_files(manifest):
        safe_path(folder, rel)
    return manifest


def load_block(folder: Path, record: dict) -> list[QuantizedLinear]:
    data = read_checked(folder, record["file"], record["sha256"])
    try:
        tensors = st_load_numpy(data)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"artifact file {record['file']} is unreadable: {e}") from None
    layers = []
    for meta in record["layers"]:
        prefix = meta["name"] + "."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if tensors_checksum(mine) != meta.get("sha256"):
            raise ArtifactError(f"layer {meta['name']} is corrupted (checksum mismatch)")
        try:
            layers.append(QuantizedLinear.from_storage(meta, mine))
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"layer {meta['name']} is malformed: {e}") from None
    return layers


def load_layers(folder: str | os.PathLike, manifest: dict) -> dict[str, QuantizedLinear]:
    folder = Path(folder)
    return {layer.name: layer for rec in manifest["blocks"] for layer in load_block(folder, rec)}


def load_dense(folder: str | os.PathLike, manifest: dict) -> dict:
    from safetensors.torch import load as st_load_torch

    rec = manifest["dense"]
    data = read_checked(Path(folder), rec["file"], rec["sha256"])
    return st_load_torch(data)
