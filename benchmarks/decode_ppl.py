"""Perplexity through the decode path: teacher-forced, one token at a time through the KV cache.

    python benchmarks/decode_ppl.py TARGET [TARGET ...] [--windows 6] [--len 256] [--threads 2]
        [--json F]

`quipc eval` scores whole windows through a backend's prompt path (prefill / forward), which
for some builds is another kernel than the one a chat decodes with: a TVM build's decode GEMVs
may run on int8 activations (`--tvm-activations int8`), the kernels runtime's on request
(`quipc_runtime.load(..., int8_activations=True)`). This scores the decode kernels themselves:
window w is tokens [w*len, (w+1)*len) of WikiText-2 test (the model's tokenizer), each token
fed through decode at its position, the next token's negative log-likelihood summed. Windows
are short (256) and few: compare TARGETs on the same windows, not with PROTOCOL figures.

A TARGET is a TVM build folder, or an artifact folder with a suffix naming its runtime:
ART@kernels (fp32 activations, a trellis lm_head's GEMV on the 8-bit copy of its rows, the
blocks' exact), ART@kernels-int8 (the same on int8 activations), ART@kernels-exact (every GEMV
exact), ART@kernels-8bit-all (every trellis layer's GEMV on the 8-bit copy of its rows, blocks
too: the loader's default since stop 51); ART@lean and ART@lean-int8: the loader's default
(fp32 / int8 activations) decoded by quipc_runtime.kernels_lm.KernelsLM, the C++ blocks that
`quipc chat` and `quipc bench`'s runtime use since stop 52.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.test.raw"


class _TorchDecoder:
    """An artifact through quipc_runtime (the kernels runtime): decode() with its own cache."""

    def __init__(self, folder: str, int8: bool, trellis_as_int8: bool | str = True):
        import quipc_runtime

        self.model = quipc_runtime.load(folder, backend="kernels", int8_activations=int8,
                                        trellis_as_int8=trellis_as_int8)
        self.past = None

    def start(self, capacity: int) -> None:
        self.past = None

    def step(self, token: int, pos: int) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].double().numpy()


class _LeanDecoder:
    """An artifact through quipc_runtime.kernels_lm.KernelsLM (its C++ blocks)."""

    def __init__(self, folder: str, int8: bool, threads: int):
        from quipc_runtime.kernels_lm import load_lean

        self.lm, self.cache = load_lean(folder, int8_activations=int8, threads=threads), None

    def start(self, capacity: int) -> None:
        self.cache = self.lm.new_cache(capacity)

    def step(self, token: int, pos: int) -> np.ndarray:
        return self.lm.decode(token, pos, self.cache).astype(np.float64)


class _TvmDecoder:
    def __init__(self, folder: str, threads: int):
        from quipc_runtime.tvm_runtime import TvmLM

        self.lm, self.cache = TvmLM(folder, threads=threads), None

    def start(self, capacity: int) -> None:
        self.cache = self.lm.new_cache(capacity)

    def step(self, token: int, pos: int) -> np.ndarray:
        return self.lm.decode(token, pos, self.cache).astype(np.float64)


def decoder(target: str, threads: int):
    if "@" in target:
        folder, runtime = target.rsplit("@", 1)
        if runtime in ("lean", "lean-int8"):
            return _LeanDecoder(folder, runtime == "lean-int8", threads)
        copies = {"kernels": "head", "kernels-int8": "head", "kernels-exact": "none", "kernels-8bit-all": "all"}
        if runtime not in copies:
            raise SystemExit(f"{target}: the runtime suffix is one of "
                             + ", ".join("@" + r for r in (*copies, "lean", "lean-int8")))
        return _TorchDecoder(folder, runtime == "kernels-int8", trellis_as_int8=copies[runtime])
    return _TvmDecoder(target, threads)


def tokenizer_of(target: str):
    """The artifact's tokenizer, or the copy a TVM build keeps in tokenizer/."""
    from transformers import AutoTokenizer

    from quipc_runtime.loader import load_tokenizer

    folder = Path(target.rsplit("@", 1)[0])
    if "@" not in target and (folder / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(folder / "tokenizer")
    return load_tokenizer(folder)


def window_nll(dec, ids: np.ndarray) -> float:
    """Mean NLL of ids[1:] given the prefix, one decode step per token."""
    dec.start(len(ids))
    total = 0.0
    for t in range(len(ids) - 1):
        logits = dec.step(int(ids[t]), t)
        m = logits.max()
        total += m + math.log(np.exp(logits - m).sum()) - logits[ids[t + 1]]
    return total / (len(ids) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    tok = tokenizer_of(args.targets[0])
    text = Path(args.text).read_text()[:50 * args.len * args.windows]
    ids = np.asarray(tok(text)["input_ids"], np.int64)
    if ids.size < args.windows * args.len:
        raise SystemExit(f"{args.text}: {ids.size} tokens, fewer than {args.windows} x {args.len}")
    records = []
    for target in args.targets:
        dec = decoder(target, args.threads)
        t0 = time.time()
        nll = [window_nll(dec, ids[w * args.len:(w + 1) * args.len]) for w in range(args.windows)]
        rec = {"target": target, "decode_ppl": math.exp(float(np.mean(nll))),
               "per_window": [round(math.exp(v), 4) for v in nll], "seconds": round(time.time() - t0, 1)}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del dec
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/decode_ppl.py " + " ".join(args.targets)
                       + f" --windows {args.windows} --len {args.len} --threads {args.threads}",
            "text": args.text, "records": records}, indent=1))


if __name__ == "__main__":
    main()
