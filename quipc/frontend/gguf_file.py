"""A GGUF file read once per process: its parsed metadata (`reader`), its transformers config
(`config`) and the map from its tensor names to the transformers model's (`weights_map`).

gguf-py's `GGUFReader` parses every metadata array element by element: for SmolLM2's GGUF
(49,152 tokens and as many merges) one parse takes ~9 s on a 2-core host, and transformers'
`load_gguf_checkpoint` makes one more each time it is asked for the config. Compiling the file
used to parse it five times (~47 s of a 100-s RTN compile) and build gguf-py's tensor-name table
once per module of the model (~13 s). Entries are keyed by the file's path, size and
modification time, so a file rewritten in place is read again."""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path


def _identity(path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def reader(path):
    """gguf-py's GGUFReader of `path`, shared within the process (read-only: its memory map
    is opened read-only, and callers only read fields and tensors)."""
    return _reader(*_identity(path))


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    try:
        parsed = GGUFReader(path)
    except Exception as e:   # gguf-py raises whatever its parse meets (struct, numpy, index errors)
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): truncated or "
                         "corrupted?") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in parsed.tensors), default=0)
    if end > size:
        raise ValueError(f"{path} is truncated: its tensors end at byte {end:,}, the file has {size:,} bytes")
    return parsed


def config(folder, gguf_file: str):
    """transformers' config of a GGUF file (AutoConfig's own parse, once per file; a fresh copy
    each call, as callers change their config). The file is parsed by `reader` first, which
    names a truncated or corrupted file (transformers' parse would fail somewhere inside)."""
    reader(Path(folder) / gguf_file)
    return copy.deepcopy(_config(str(Path(folder)), gguf_file, *_identity(Path(folder) / gguf_file)))


@functools.lru_cache(maxsize=4)
def _config(folder: str, gguf_file: str, path: str, size: int, mtime_ns: int):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)


def weights_map(model, processor) -> dict[str, str]:
    """{GGUF tensor name: transformers parameter name} for `model` (a skeleton is enough).

    transformers' `get_gguf_hf_weights_map` looks the model's names up at the top module and
    again in every sub-module (for models converted from a base class, such as Bloom), building
    gguf-py's name table at each of the ~400 modules. The top module's names alone are looked up
    first; the recursive walk runs only when they leave a parameter unmapped."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    flat = get_gguf_hf_weights_map(_TopModule(model), processor)
    if set(flat.values()) >= set(model.state_dict()):
        return flat
    return get_gguf_hf_weights_map(model, processor)


class _TopModule:
    """`model` as `get_gguf_hf_weights_map` sees it, without its sub-modules."""

    def __init__(self, model):
        self.config = model.config
        self._model = model

    def state_dict(self):
        return self._model.state_dict()

    def named_children(self):
        return []
