"""How far greedy answers move under small, known weight errors: the ceiling of answer agreement.

    python benchmarks/agreement_ceiling.py --json benchmarks/results/agreement_ceiling.json \
        [--perturb bf16 int8 int6 int5 int4 noise1e-3 noise1e-2] [--threads 2]

The fp32 model's decoder linears (every nn.Linear inside the blocks; embedding, head and norms
untouched) are perturbed in a known way and the perturbed model's chat answers are scored against
the fp32 answers exactly as benchmarks/agreement.py scores an artifact (PROTOCOL "Answer
agreement": quipc.eval.agreement's prompts, 48 greedy tokens, ROUGE-L F1 over token ids):

- bf16: each weight rounded to bfloat16 (relative error <= 2^-9);
- intN: round to nearest on a per-row symmetric grid of 2^(N-1) - 1 steps of max|w| (RTN);
- noiseE: w + E * rms(row) * a fixed Gaussian draw (seed 0), relative weight error E.

Each record also holds the relative weight error ||dW|| / ||W|| over those layers, so that a
quantized artifact's agreement can be read against the error that costs the same agreement.
Greedy decoding is chaotic: one flipped token changes the rest of the answer, which is why even
weight errors far below any quantizer's leave the score short of 1.0. The fp32 answers are the
ones benchmarks/agreement.py caches (computed if missing).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agreement import records_and_reference, write_records  # noqa: E402  (benchmarks/ is the script's folder)


def perturb_(weight: torch.Tensor, kind: str, gen: torch.Generator) -> None:
    w = weight.data
    if kind == "bf16":
        w.copy_(w.to(torch.bfloat16).to(w.dtype))
    elif kind.startswith("int"):
        steps = 2 ** (int(kind[3:]) - 1) - 1
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / steps
        w.copy_(torch.round(w / scale).clamp(-steps, steps) * scale)
    elif kind.startswith("noise"):
        eps = float(kind[5:])
        rms = w.pow(2).mean(dim=1, keepdim=True).sqrt()
        w.add_(eps * rms * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    else:
        raise ValueError(f"unknown perturbation {kind!r}: bf16 | intN | noiseE")


def perturbed_model(spec: str, kind: str):
    from quipc.frontend.hf import load_model
    from quipc.frontend.models import resolve

    model, tok = load_model(resolve(spec))
    gen = torch.Generator().manual_seed(0)
    num = den = 0.0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
                before = mod.weight.detach().clone()
                perturb_(mod.weight, kind, gen)
                num += float((mod.weight - before).pow(2).sum())
                den += float(before.pow(2).sum())
    if den == 0:
        raise ValueError(f"{spec}: no decoder linears found under '.layers.'")
    return model, tok, (num / den) ** 0.5


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--perturb", nargs="+", default=["bf16", "int8", "int6", "int5", "int4", "noise1e-3", "noise1e-2"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from quipc.eval.agreement import agreement, chat_answers, forced_agreement

    path = Path(args.json)
    records, reference = records_and_reference(path, args.model)
    for kind in args.perturb:
        rec = next((r for r in records if r["perturb"] == kind and r["model"] == args.model), None)
        if rec is not None and "forced_top1" in rec:
            continue
        model, tok, rel = perturbed_model(args.model, kind)   # seeded: a record from before gains its
        if rec is None:                                       # forced columns from the same model
            rec = {"model": args.model, "perturb": kind, "weight_rel_err": rel,
                   **agreement(chat_answers(model, tok), reference)}
            records.append(rec)
        rec.update(forced_agreement(model, tok, reference))
        write_records(path, records)
        print(f"{kind:>10}  weight rel. err {rel:.2e}  agreement {rec['rouge_l']:.3f}  "
              f"identical {rec['identical']}/{rec['prompts']}  fp32's tokens picked {rec['forced_top1']:.3f}  "
              f"their NLL {rec['forced_nll']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
