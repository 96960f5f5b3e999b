"""Decode time of several TVM builds (or ONNX exports) of one model, interleaved in one process.

    python benchmarks/tvm_builds.py BUILD_A BUILD_B [...] [--prompt-len 128] [--new-tokens 32]
        [--reps 9] [--threads 2] [--json F]

A BUILD is a TVM build folder or an ONNX export (a folder holding model.onnx, or the .onnx
file), e.g. the hand-written and the traced graph of one artifact. An ONNX export runs with
quipc's custom-op library where it is built; `EXPORT#bodies` runs the same file through its
function bodies (stock onnxruntime), so `EXPORT#bodies EXPORT` is issue 13's comparison. A
quipc artifact folder (manifest.json) runs through the C++ kernels runtime
(`quipc_runtime.load(ART, backend="kernels")`, transformers' model with the fused kernels;
every trellis layer's decode GEMV on an 8-bit copy of its rows, the loader's default;
`ART#int8` with int8 activations too, `ART#8bit-head` with only the lm_head's GEMV on its copy,
the blocks' exact; `ART#lean` / `ART#lean-int8`: the loader's default decoded by
quipc_runtime.kernels_lm.KernelsLM, the C++ blocks, with fp32 / int8 activations), e.g. issue
16's dense-head and quantized-head artifacts.

For comparing two builds of the same artifact (before and after a change to the TVM backend):
each repetition prefills the prompt and decodes --new-tokens greedy tokens through every build
in turn, in a cache of prompt + new tokens; the figures are ms per decoded token and ms of the
prompt's prefill, medians over the repetitions (one warm-up generation per build first). The
paired ratios per repetition are what to read on a noisy host.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def generate_ms(lm, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill ms, decode ms per token) of one greedy generation."""
    cache = lm.new_cache(prompt.size + new_tokens)
    t0 = time.perf_counter()
    logits = lm.prefill(prompt, cache)
    t1 = time.perf_counter()
    for i in range(new_tokens):
        logits = lm.decode(int(np.argmax(logits)), prompt.size + i, cache)
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) / new_tokens * 1e3


class OnnxBuild:
    """OnnxLM through TvmLM's new_cache / prefill / decode (the cache: past arrays and length)."""

    def __init__(self, path, threads: int, custom_ops: bool | None = None):
        from quipc_runtime.onnx_runtime import OnnxLM

        self.lm = OnnxLM(path, threads=threads, custom_ops=custom_ops)
        self.vocab = int(self.lm.logits(np.zeros(1, np.int64)).shape[-1])

    def new_cache(self, capacity: int) -> dict:
        return {}

    def prefill(self, prompt: np.ndarray, cache: dict) -> np.ndarray:
        logits, cache["past"] = self.lm.prefill(prompt)
        return logits

    def decode(self, token: int, pos: int, cache: dict) -> np.ndarray:
        logits, cache["past"] = self.lm.decode(token, cache["past"], pos)
        return logits


class KernelsBuild:
    """A quipc artifact through the C++ kernels runtime, with transformers' KV cache."""

    def __init__(self, path, threads: int, int8: bool = False, trellis_as_int8: str = "head"):
        import torch

        import quipc_runtime

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = quipc_runtime.load(path, backend="kernels", int8_activations=int8,
                                        trellis_as_int8=trellis_as_int8).eval()
        self.vocab = int(self.model.config.vocab_size)

    def new_cache(self, capacity: int) -> dict:
        return {}

    def _step(self, ids, cache: dict) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.as_tensor(ids)[None], past_key_values=cache.get("past"), use_cache=True)
        cache["past"] = out.past_key_values
        return out.logits[0, -1].numpy()

    def prefill(self, prompt: np.ndarray, cache: dict) -> np.ndarray:
        return self._step(np.asarray(prompt, np.int64), cache)

    def decode(self, token: int, pos: int, cache: dict) -> np.ndarray:
        return self._step(np.array([token], np.int64), cache)


def load(build: str, threads: int):
    from pathlib import Path

    from quipc_runtime.tvm_runtime import TvmLM

    bodies = build.endswith("#bodies")
    art, _, option = build.partition("#")
    if (Path(art) / "manifest.json").is_file():
        if option not in ("", "int8", "8bit-head", "lean", "lean-int8"):
            raise ValueError(f"{build}: an artifact takes #int8, #8bit-head, #lean or #lean-int8")
        if option.startswith("lean"):
            import torch

            from quipc_runtime.kernels_lm import load_lean

            torch.set_num_threads(threads)
            return load_lean(art, int8_activations=option == "lean-int8", threads=threads)
        return KernelsBuild(art, threads, int8=option == "int8", trellis_as_int8="head" if option == "8bit-head" else "all")
    path = Path(build.removesuffix("#bodies"))
    if path.suffix == ".onnx" or (path / "model.onnx").is_file():
        return OnnxBuild(path, threads, custom_ops=False if bodies else None)
    if bodies:
        raise ValueError(f"{build}: #bodies applies to ONNX exports only")
    return TvmLM(path, threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="TVM builds, ONNX exports or artifacts of the same model")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the records here")
    a = ap.parse_args()
    lms = [load(b, a.threads) for b in a.builds]
    prompt = (np.arange(a.prompt_len) * 7 + 200) % min(lm.vocab for lm in lms)
    for lm in lms:
        generate_ms(lm, prompt, 4)
    times = {b: [] for b in a.builds}
    for _ in range(a.reps):
        for b, lm in zip(a.builds, lms):
            times[b].append(generate_ms(lm, prompt, a.new_tokens))
    first = np.array(times[a.builds[0]])
    records = []
    for b in a.builds:
        t = np.array(times[b])   # (reps, 2): prefill ms, decode ms per token
        rec = {"build": b, "decode_ms": float(np.median(t[:, 1])), "decode_ms_each": [round(x, 3) for x in t[:, 1]],
               "paired_ratio_to_first": float(np.median(t[:, 1] / first[:, 1])),
               "prefill_ms": float(np.median(t[:, 0])), "prefill_ms_each": [round(x, 2) for x in t[:, 0]],
               "prefill_paired_ratio_to_first": float(np.median(t[:, 0] / first[:, 0])),
               "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "threads": a.threads, "reps": a.reps}
        records.append(rec)
        print(f"{b}: {rec['decode_ms']:.2f} ms/token (median of {a.reps}), paired ratio to the first "
              f"{rec['paired_ratio_to_first']:.3f}; prefill {rec['prefill_ms']:.1f} ms, paired "
              f"{rec['prefill_paired_ratio_to_first']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
