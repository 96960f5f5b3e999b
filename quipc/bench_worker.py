"""The worker process of `quipc bench`: one backend, loaded once, then timed on request.

quipc/bench.py starts one worker per backend (spawned, so that its peak memory is its own) and
sends it "run" or "stop". One "run" = one repetition: prefill of the prompt (timed) +
`new_tokens` greedy decode steps with the KV cache (timed), answered with
("ok", {prefill_ms, decode_ms, peak_mb}); a backend that fails to load answers ("error", why).
"""
from __future__ import annotations

import os
import time
import traceback

from .bench_llamacpp import LLAMACPP_TYPES


# --- drivers: prefill(ids) -> (token, state), decode(token, pos, state) -> (token, state) ---
class TorchLM:
    """A transformers causal LM driven step by step with its KV cache."""

    def __init__(self, model):
        import inspect

        import torch

        self.torch, self.model = torch, model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def prefill(self, ids):
        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.as_tensor(ids)[None], use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        return int(out.logits[0, -1].argmax()), cache

    def decode(self, tok, pos, cache):
        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([[tok]]), use_cache=True, **{self.cache_kw: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        return int(out.logits[0, -1].argmax()), cache


class OnnxDriver:
    def __init__(self, lm):
        self.lm = lm

    def prefill(self, ids):
        import numpy as np

        res = self.lm.prefill(np.asarray(ids)[None])
        logits, past = res[0], res[1]
        return int(np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[-1].argmax()), (past, len(ids))

    def decode(self, tok, pos, state):
        import numpy as np

        past, past_len = state
        res = self.lm.decode(tok, past, past_len)
        logits, past = res[0], res[1]
        return int(np.asarray(logits).reshape(-1)[-np.asarray(logits).shape[-1]:].argmax()), (past, past_len + 1)


class CacheDriver:
    """A language model with its own preallocated cache (TvmLM, KernelsLM)."""

    def __init__(self, lm, total: int):
        self.lm, self.total = lm, total

    def prefill(self, ids):
        cache = self.lm.new_cache(-(-self.total // 16) * 16)
        return int(self.lm.prefill(ids, cache).argmax()), cache

    def decode(self, tok, pos, cache):
        return int(self.lm.decode(tok, pos, cache).argmax()), cache


def _load_backend(name: str, spec: dict, threads: int):
    """Build the driver of one backend inside its worker (after threads are configured)."""
    art = spec["artifact"]
    if name in ("torch-ref", "runtime", "runtime-transformers"):
        import quipc_runtime

        # runtime: as `quipc chat` decodes (int8 activations, the lean decoder where it runs the
        # family); runtime-transformers: the kernels model through transformers, fp32 activations
        model = quipc_runtime.load(art, backend="reference" if name == "torch-ref" else "kernels",
                                   int8_activations=name == "runtime")
        if name == "runtime":   # the lean decoder where it runs the family (quipc_runtime.kernels_lm)
            from quipc_runtime.kernels_lm import KernelsLM, lean

            model = lean(model, threads=threads)
            if isinstance(model, KernelsLM):
                return CacheDriver(model, spec["prompt_len"] + spec["new_tokens"] + 1)
        return TorchLM(model)
    if name == "fp32-torch":
        from quipc.frontend.hf import load_model
        from quipc.frontend.models import resolve

        model, _ = load_model(resolve(spec["source_spec"]))
        return TorchLM(model.eval())
    if name in ("onnx", "fp32-onnx") or name.startswith("onnx-"):
        from quipc_runtime.onnx_runtime import OnnxLM

        custom_ops = None if spec["onnx_custom_ops"] else False   # None: the library when built
        return OnnxDriver(OnnxLM(spec["onnx_path"], threads=threads, custom_ops=custom_ops))
    if name == "tvm" or name.startswith("tvm-"):
        from quipc_runtime.tvm_runtime import TvmLM

        return CacheDriver(TvmLM(spec["tvm_path"], threads=threads), spec["prompt_len"] + spec["new_tokens"] + 1)
    if name in LLAMACPP_TYPES:
        from .bench_llamacpp import LlamaCppDriver

        total = spec["prompt_len"] + spec["new_tokens"] + 1
        return LlamaCppDriver(spec["gguf_path"], threads, n_ctx=-(-total // 256) * 256, n_batch=spec["prompt_len"])
    raise ValueError(name)


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc/self/status (Linux).

    Not getrusage's ru_maxrss: across exec it keeps the high-water mark of the forked
    parent's pages, so every spawned worker would report at least the parent's size."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(rest.split()[0]) / 1024.0   # kB
    except OSError:
        pass
    if "VmHWM" not in fields:   # not Linux: the portable (coarser) figure
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return peak, peak
    return fields.get("VmRSS", fields["VmHWM"]), fields["VmHWM"]


def worker(name: str, spec: dict, threads: int, conn) -> None:
    """One backend's process: load it, answer "ready" (or "error"), then one repetition per "run"."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["TVM_NUM_THREADS"] = os.environ["QUIPC_NUM_THREADS"] = str(threads)
    try:
        if name not in LLAMACPP_TYPES:   # llama.cpp's peak memory is its own, torch not loaded
            import torch

            torch.set_num_threads(threads)
        before, _ = _rss_mb()
        drv = _load_backend(name, spec, threads)
        loaded, _ = _rss_mb()
        conn.send(("ready", {"rss_before_load_mb": before, "rss_loaded_mb": loaded}))
    except Exception as e:  # reported as skipped, with the reason
        conn.send(("error", f"{type(e).__name__}: {e}".strip()[:500]))
        conn.close()
        return
    ids = spec["prompt"]
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        try:
            t0 = time.perf_counter()
            tok, state = drv.prefill(ids)
            t1 = time.perf_counter()
            pos = len(ids)
            for _ in range(spec["new_tokens"]):
                tok, state = drv.decode(tok, pos, state)
                pos += 1
            t2 = time.perf_counter()
            conn.send(("ok", {"prefill_ms": (t1 - t0) * 1e3,
                              "decode_ms": (t2 - t1) * 1e3 / max(spec["new_tokens"], 1),
                              "peak_mb": _rss_mb()[1]}))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"[:500] + "\n" + traceback.format_exc()[-800:]))
    conn.close()
