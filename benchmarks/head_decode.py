"""Decode time of the lm_head alone (batch 1, one token) of several artifacts, interleaved.

    python benchmarks/head_decode.py --threads 2 ART_A ART_B [...]

The head is the largest matmul of every decoded token (SmolLM2: 49152 x 576), so its code
format (`quipc compile --head-format`) shows in decode time; the whole-model decode is
`quipc bench`. Each artifact's head runs through the kernels runtime (quipc.load(...,
backend="kernels")); the artifacts take turns, ROUNDS times CALLS calls each; median and min
per call in ms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ["QUIPC_NUM_THREADS"] = str(args.threads)
    import torch

    import quipc

    torch.set_num_threads(1)   # as the kernels runtime does while a model runs: its pool takes the threads
    from quipc_runtime import artifact as art

    heads, meta = {}, {}
    for path in args.artifacts:
        man = art.read_manifest(Path(path))
        layer = (man.get("head") or {}).get("layers", [{}])[0]
        meta[path] = {"head_bits": layer.get("bits", 32), "head_format": layer.get("format", "dense")}
        heads[path] = quipc.load(path, backend="kernels").get_output_embeddings()
    x = torch.randn(1, 1, heads[args.artifacts[0]].in_features, generator=torch.Generator().manual_seed(0))
    times = {p: [] for p in heads}
    with torch.no_grad():
        for head in heads.values():
            head(x)                                         # warm-up
        for _ in range(args.rounds):
            for p, head in heads.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    head(x)
                times[p].append((time.perf_counter() - t0) / args.calls * 1e3)
    rows = [{"artifact": Path(p).name, **meta[p], "median_ms": statistics.median(t), "min_ms": min(t),
             "threads": args.threads} for p, t in times.items()]
    for r in rows:
        print(f"{r['artifact']:32s} head {r['head_bits']}-bit {r['head_format']:8s} "
              f"{r['median_ms']:.2f} ms (min {r['min_ms']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
