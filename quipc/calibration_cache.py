"""Calibration text the model wrote, kept on this machine for the next compile of the same model.

A data-free compile spends minutes (4-9 for SmolLM2-135M on 2 cores) letting the model write its
calibration windows (through transformers, or through onnxruntime for an .onnx input), and the text
is the same every time the same model is compiled with the same calibration settings on the same
machine: a compile at another width, or a resumed one, reads it back. The key holds everything the
text depends on: the model's files (path, size and modification time of each), the part's settings
(windows, length, seed, batch, the chat turn lengths), the code that writes it (its source files'
sha256), the library versions, the CPU, the thread count and the device. The manifest still names
the tokens by sha256, so a reader can tell a compile that read them from one that wrote them only by
its log line.

Stored under $QUIPC_CACHE_DIR, else $XDG_CACHE_HOME/quipc, else ~/.cache/quipc, in
calibration/<key>.safetensors; QUIPC_NO_CACHE=1 turns it off. A file that does not read back as
the expected windows is written again; a cache that cannot be written is skipped with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Callable

import torch

_WRITERS = ("frontend/calibration.py", "frontend/chat_calibration.py", "calibration_cache.py")
ONNX_WRITERS = ("frontend/onnx_calibration.py", "calibration_cache.py")   # an .onnx input's generated text


def cache_dir() -> Path | None:
    if os.environ.get("QUIPC_NO_CACHE", "") not in ("", "0"):
        return None
    if os.environ.get("QUIPC_CACHE_DIR"):
        return Path(os.environ["QUIPC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quipc"


def model_fingerprint(source) -> list:
    """The model's files as (path, size, mtime): any rewrite of a file changes the key."""
    files = [Path(source.folder) / source.gguf_file] if source.gguf_file else \
        sorted(p for p in Path(source.folder).rglob("*") if p.is_file())
    return files_fingerprint(files)


def files_fingerprint(files) -> list:
    """(path, size, mtime) of each file, in the order given."""
    stats = [(Path(p), Path(p).stat()) for p in files]
    return [[str(p.resolve()), st.st_size, st.st_mtime_ns] for p, st in stats]


def part_key(model: list, part: dict, device, writers: tuple[str, ...] = _WRITERS) -> str:
    """The cache key of one part's windows; `writers`: the source files (under quipc/) of the
    code that writes them."""
    import transformers

    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in writers)).hexdigest()
    blob = {"model": model, "part": part, "device": str(device), "code": code, "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": _cpu_name(), "threads": torch.get_num_threads()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cached_windows(key: str | None, windows: int, write: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(the part's windows, whether they were read from the cache): write() when the cache has
    no good copy under `key` (None: no cache), then stored for next time."""
    folder = cache_dir()
    if key is None or folder is None:
        return write(), False
    path = folder / "calibration" / f"{key}.safetensors"
    kept = _read(path, windows)
    if kept is not None:
        return kept, True
    made = write()
    _store(path, made)
    return made, False


def kept_message(desc: str, windows: int) -> str:
    """What a compile prints when a part's windows came from the cache."""
    return f"{desc}: {windows} windows this machine wrote before, read from its cache"


def _read(path: Path, windows: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ids = load_file(path)["windows"]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None   # damaged or foreign: written again
    if ids.dim() != 2 or ids.shape[0] != windows or ids.dtype != torch.int64:
        return None
    return ids


def _store(path: Path, ids: torch.Tensor) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"windows": ids.to(torch.int64).contiguous()}, tmp)
        os.replace(tmp, path)   # atomic: a reader sees the whole file or none
    except (OSError, SafetensorError) as err:
        warnings.warn(f"quipc: could not keep the calibration text in {path.parent} ({err}); "
                      "set QUIPC_CACHE_DIR to a writable folder or QUIPC_NO_CACHE=1", stacklevel=2)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass   # its folder could not be made
