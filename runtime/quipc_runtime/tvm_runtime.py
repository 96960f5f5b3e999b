"""Run a model compiled by `quipc compile ... --target tvm` with the TVM runtime alone.

    lm = TvmLM(folder)                  # model.so + params.bin + tvm_config.json
    lm.logits(ids)                      # (L, vocab) numpy, e.g. for perplexity
    lm.generate(ids, max_new_tokens)    # greedy, with the KV cache kept on the device

The compiled functions follow the contract written in tvm_config.json: prompt rows padded to
a multiple of `row_multiple` (padding at the end; causal attention keeps it out of real rows),
KV caches of capacity a multiple of `cache_multiple`, updated in place by the library.
This module imports neither quipc nor torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

CONFIG = "tvm_config.json"


def _ceil_to(v: int, m: int) -> int:
    return -(-v // m) * m


def ensure_cuda_runtime() -> None:
    """Register TVM's CUDA module loader. With the compiler library loaded this is already
    done; with the runtime library alone (TVM_USE_RUNTIME_LIB=1, or a runtime-only install)
    libtvm_runtime_cuda.so must be loaded explicitly."""
    import ctypes

    import tvm

    import tvm.base

    if getattr(tvm.base, "_RUNTIME_ONLY", False):
        _register_nvcc_callback()
    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", True) is not None:
        return
    lib_dir = Path(tvm.__file__).parent / "lib"
    for name in ("libtvm_runtime_cuda.so", "libtvm_runtime_extra.so"):
        if (lib_dir / name).is_file():
            ctypes.CDLL(str(lib_dir / name), mode=ctypes.RTLD_GLOBAL)
    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", True) is None:
        raise RuntimeError(f"this TVM install has no CUDA runtime (looked in {lib_dir})")


def _register_nvcc_callback() -> None:
    """TVM 0.27 ships CUDA kernels as source and compiles them when the library is loaded,
    through the Python callback `tvm_callback_cuda_compile`, whose stock version needs the
    compiler library. With the runtime alone, compile them with the CUDA toolkit's nvcc for
    the GPU at hand instead."""
    import shutil
    import subprocess
    import tempfile

    import tvm
    import tvm_ffi

    def compile_cuda(code, *_):
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        arch = "sm_" + str(tvm.cuda(0).compute_version).replace(".", "")
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.cubin"
            src.write_text(str(code))
            res = subprocess.run([nvcc, "--cubin", f"-arch={arch}", "-O3", "-o", str(out), str(src)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on the TVM kernels: {res.stderr[-2000:]}")
            return bytearray(out.read_bytes())

    try:  # let the stock callback register first (it may be imported lazily), then replace it
        import tvm.support.nvcc  # noqa: F401
    except Exception:
        pass
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def _is_traced(folder) -> bool:
    cfg = Path(folder) / CONFIG
    return cfg.is_file() and json.loads(cfg.read_text()).get("graph") == "traced"


def import_tvm(threads: int | None):
    """The tvm module, its CPU thread pool set to `threads` (None: TVM's own default)."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm

    if threads:
        cfg_pool = tvm.get_global_func("runtime.config_threadpool", True)
        if cfg_pool is not None:
            cfg_pool(-1, int(threads))  # -1: big cores, as many as asked
    return tvm


def check_param_types(arrays, cfg: dict, folder) -> None:
    """The parameters' shapes and dtypes against the build's config. Builds that record them
    (param_types) take the tuple unchecked on every call, so a params.bin of other shapes must
    stop here, with an error, and not reach a kernel."""
    want = cfg.get("param_types")
    if want is None:
        return   # older builds: the VM checks the tuple on each call
    if len(want) != len(arrays):
        raise ValueError(f"{folder}: {len(arrays)} parameters, the build expects {len(want)}")
    for name, a, (shape, dtype) in zip(cfg["params"], arrays, want):
        if list(a.shape) != list(shape) or str(a.dtype) != dtype:
            raise ValueError(f"{folder}/params.bin: {name} is {str(a.dtype)}{list(a.shape)}, "
                             f"the build expects {dtype}{list(shape)}")


class TvmLM:
    def __new__(cls, folder, threads: int | None = None):
        """A traced build (`--graph traced`) is run by tvm_traced.TracedTvmLM, same interface."""
        if cls is TvmLM and _is_traced(folder):
            from .tvm_traced import TracedTvmLM

            return TracedTvmLM(folder, threads=threads)
        return super().__new__(cls)

    def __init__(self, folder, threads: int | None = None):
        folder = Path(folder)
        cfg_path = folder / CONFIG
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} is not a quipc TVM build ({CONFIG} is missing)")
        self.cfg = json.loads(cfg_path.read_text())
        if self.cfg.get("format") != "quipc-tvm":
            raise ValueError(f"{cfg_path} is not a quipc TVM config")
        tvm = import_tvm(threads)
        from tvm.runtime import vm as tvm_vm

        self.threads = threads or int(os.environ.get("TVM_NUM_THREADS", 0)) or os.cpu_count()
        self.tvm = tvm
        if self.cfg["device"] == "cuda":
            ensure_cuda_runtime()
        self.dev = tvm.cuda(0) if self.cfg["device"] == "cuda" else tvm.cpu(0)
        lib = tvm.runtime.load_module(str(folder / "model.so"))
        self.vm = tvm_vm.VirtualMachine(lib, self.dev)
        loaded = tvm.runtime.load_param_dict_from_file(str(folder / "params.bin"))
        missing = [n for n in self.cfg["params"] if n not in loaded]
        if missing:
            raise ValueError(f"{folder}/params.bin lacks parameters {missing[:3]}")
        arrays = [loaded[n] for n in self.cfg["params"]]
        check_param_types(arrays, self.cfg, folder)
        if self.cfg["device"] == "cuda":
            arrays = [a.copyto(self.dev) for a in arrays]
        self.params = tvm.runtime.convert(arrays)
        m = self.cfg["model"]
        self.layers, self.kv_heads, self.head_dim = m["layers"], m["kv_heads"], m["head_dim"]
        self.vocab, self.max_pos = m["vocab"], m["max_pos"]
        self.row_multiple = int(self.cfg.get("row_multiple", 16))
        self.cache_multiple = int(self.cfg.get("cache_multiple", 16))
        self.eos_token_id = self.cfg.get("eos_token_id")
        # builds from before decode took its attended extent attend to the whole cache
        self.decode_span = bool(self.cfg.get("decode_span", False))
        self._f = {name: self.vm[name] for name in self.cfg["functions"]}

    # --- helpers ------------------------------------------------------------------------
    def _t(self, arr: np.ndarray):
        return self.tvm.runtime.tensor(np.ascontiguousarray(arr), self.dev)

    def new_cache(self, capacity: int):
        cap = _ceil_to(max(capacity, 1), self.cache_multiple)
        if cap > _ceil_to(self.max_pos, self.cache_multiple):
            raise ValueError(f"sequence of {capacity} tokens exceeds the model's {self.max_pos} positions")
        ck = self.tvm.runtime.empty((self.layers, self.kv_heads, self.head_dim, cap), "float32", self.dev)
        cv = self.tvm.runtime.empty((self.layers, self.kv_heads, cap, self.head_dim), "float32", self.dev)
        return [ck, cv]

    def _padded(self, ids) -> tuple[np.ndarray, int]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = ids.size
        if n == 0:
            raise ValueError("empty prompt")
        if n > self.max_pos:
            raise ValueError(f"{n} tokens exceed the model's {self.max_pos} positions")
        pad = np.zeros(_ceil_to(n, self.row_multiple), np.int32)
        pad[:n] = ids
        return pad, n

    # --- API ----------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Logits of every position of one sequence (ids: (L,) or (1, L)) -> (L, vocab)."""
        pad, n = self._padded(ids)
        cache = self.new_cache(pad.size)
        out = self._f["prefill_all"](self._t(pad), cache[0], cache[1], self.params)
        return out[0].numpy()[:n]

    def prefill(self, ids, cache) -> np.ndarray:
        """Run the prompt, filling positions [0, L) of `cache`; returns the last row's logits (V,)."""
        pad, n = self._padded(ids)
        if pad.size > int(cache[0].shape[3]):
            raise ValueError(f"prompt of {n} tokens does not fit a cache of {cache[0].shape[3]} positions")
        out = self._f["prefill"](self._t(pad), self._t(np.array([n - 1], np.int64)), cache[0], cache[1],
                                 self.params)
        cache[0], cache[1] = out[1], out[2]
        return out[0].numpy()[0]

    def decode(self, token: int, pos: int, cache) -> np.ndarray:
        """One token at position `pos` (cache holds [0, pos)); returns its logits (V,)."""
        if not 0 <= pos < int(cache[0].shape[3]):
            raise ValueError(f"position {pos} is outside the cache ({cache[0].shape[3]} positions)")
        args = [self._t(np.array([token], np.int32)), self._t(np.array([pos], np.int64))]
        if self.decode_span:
            args.append(self.tvm.runtime.ShapeTuple([_ceil_to(pos + 1, self.cache_multiple)]))
        out = self._f["decode"](*args, cache[0], cache[1], self.params)
        cache[0], cache[1] = out[1], out[2]
        return out[0].numpy()[0]

    def generate(self, ids, max_new_tokens: int, eos_token_id: int | None = None,
                 stop_at_eos: bool = True) -> np.ndarray:
        """Greedy generation: returns prompt + new tokens as an int64 array (1, L + n)."""
        prompt = np.asarray(ids, dtype=np.int64).reshape(-1)
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        total = prompt.size + max_new_tokens
        if total > self.max_pos:
            raise ValueError(f"{prompt.size} prompt + {max_new_tokens} new tokens exceed the model's "
                             f"{self.max_pos} positions")
        cache = self.new_cache(_ceil_to(max(total, prompt.size), self.row_multiple))
        return greedy(self, prompt, cache, max_new_tokens, eos if stop_at_eos else None)


def greedy(lm, prompt: np.ndarray, cache, max_new_tokens: int, eos: int | None) -> np.ndarray:
    """Greedy decoding through lm.prefill / lm.decode (TvmLM, TracedTvmLM): prompt + new tokens
    as an int64 array (1, L + n), stopping after `eos` when it is not None."""
    out = prompt.tolist()
    if max_new_tokens <= 0:
        return np.array([out], np.int64)
    logits = lm.prefill(prompt, cache)
    for step in range(max_new_tokens):
        tok = int(np.argmax(logits))
        out.append(tok)
        if eos is not None and tok == eos:
            break
        if step + 1 < max_new_tokens:
            logits = lm.decode(tok, len(out) - 1, cache)
    return np.array([out], np.int64)


def load(folder, threads: int | None = None) -> TvmLM:
    return TvmLM(folder, threads=threads)
