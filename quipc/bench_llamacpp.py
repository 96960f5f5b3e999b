"""llama.cpp as a baseline of `quipc bench`: the artifact's source GGUF requantized by llama.cpp's
own quantizer and decoded in the same interleaved run, same threads and prompt.

llama.cpp is what an edge user would pick instead of quipc, so its fastest types (Q4_0, which its
CPU backend repacks at load, and Q8_0) are the bar. It runs through llama-cpp-python, an optional
extra (`pip install 'quipc[llamacpp]'` builds llama.cpp from source); without it the baseline
is reported as skipped, with the reason.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

# bench backend name -> llama.cpp file type (llama.h's LLAMA_FTYPE_MOSTLY_<type>)
LLAMACPP_TYPES = {"llamacpp-q4_0": "Q4_0", "llamacpp-q8_0": "Q8_0"}


def why_not() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'quipc[llamacpp]'; it builds llama.cpp from source)"
    return None


def source_gguf(source: dict | None, given: str | None) -> tuple[Path, str]:
    """(path, sha256) of the GGUF file llama.cpp requantizes: `given` (--gguf), else the artifact's
    own source when that was a .gguf file whose sha256 is the one the manifest records."""
    from quipc.frontend.models import file_sha256, resolve

    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--gguf {path}: no such file")
    else:
        if not source or not source.get("spec"):
            raise ValueError("the artifact does not record its source model; pass --gguf FILE")
        src = resolve(source["spec"])
        if not src.gguf_file:
            raise ValueError(f"the artifact's source {source['spec']!r} is a Hugging Face folder, not a GGUF "
                             "file; pass --gguf FILE")
        path = src.folder / src.gguf_file
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic number)")
    digest = file_sha256(path)
    if not given and source.get("sha256") and digest != source["sha256"]:
        raise ValueError(f"{path} is not the file the artifact was compiled from (sha256 differs from "
                         "the manifest's source); pass --gguf FILE")
    return path, digest


def requantize(src: Path, digest: str, ftype: str, work: Path, threads: int) -> Path:
    """`src` (whose sha256 is `digest`) requantized to `ftype` by llama.cpp, cached in `work` under
    that digest; written to a temporary name and renamed, so an interrupted run leaves no half file."""
    import llama_cpp

    dst = work / f"llamacpp-{digest[:12]}-{ftype}.gguf"
    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = threads
    tmp = dst.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {ftype} (llama_model_quantize returned {rc})")
    os.replace(tmp, dst)
    return dst


class LlamaCppDriver:
    """A GGUF model in llama.cpp (llama-cpp-python's Llama), driven step by step with its KV cache
    like the other backends: prefill returns the greedy next token, decode feeds one token."""

    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        """The greedy token after the last eval: argmax of the last position's logits, read from
        llama.cpp's buffer (Llama.scores stays empty unless every position's logits are kept)."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def prefill(self, ids):
        self.llm.reset()   # the next eval drops the cache from position 0
        self.llm.eval(list(ids))
        return self._next(), None

    def decode(self, tok, pos, state):
        self.llm.eval([tok])
        return self._next(), None
