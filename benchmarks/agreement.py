"""Answer agreement of artifacts with the fp32 model (PROTOCOL "Answer agreement").

    python benchmarks/agreement.py --json benchmarks/results/agreement.json ART [ART ...]

Greedy chat answers (48 new tokens, the model's chat template, quipc.eval.agreement.PROMPTS)
of each artifact on the torch path against the unquantized source model's, ROUGE-L F1 over
token ids; and the fp32 answers fed to the artifact after their prompts (forced_top1: the share
of their tokens it picks greedily, forced_nll: their mean negative log-likelihood), which score
every position on the same text and so separate close models with far less noise than ROUGE-L
of free-running answers. The fp32 answers are computed once and cached beside the JSON; records
are keyed by artifact path and rerunning skips those already recorded (a record from before the
forced columns gains them).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def fp32_answers(cache: Path, model_spec: str) -> list:
    from quipc.eval.agreement import PROMPTS, chat_answers
    from quipc.frontend.hf import load_model
    from quipc.frontend.models import resolve

    if cache.exists():
        data = json.loads(cache.read_text())
        if data["prompts"] == PROMPTS and data.get("model") == model_spec:
            return data["answers"]
    model, tok = load_model(resolve(model_spec))
    answers = chat_answers(model, tok)
    cache.write_text(json.dumps({"model": model_spec, "prompts": PROMPTS, "answers": answers}))
    return answers


def records_and_reference(path: Path, model_spec: str) -> tuple[list, list]:
    """The records already in `path` (a JSON list) and the fp32 answers cached beside it."""
    records = json.loads(path.read_text()) if path.exists() else []
    return records, fp32_answers(path.with_name(path.stem + "_fp32_answers.json"), model_spec)


def write_records(path: Path, records: list) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--json", required=True)
    p.add_argument("--model", default="smollm2-135m", help="the unquantized source (alias, folder, .gguf)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import quipc_runtime
    from quipc.eval.agreement import agreement, chat_answers, forced_agreement
    from quipc_runtime.loader import load_tokenizer

    path = Path(args.json)
    records, reference = records_and_reference(path, args.model)
    for art in args.artifacts:
        rec = next((r for r in records if r["artifact"] == art), None)
        if rec is not None and "forced_top1" in rec:
            continue
        tok = load_tokenizer(art)
        model = quipc_runtime.load(art)
        if rec is None:   # a record from before the forced columns gains only those
            manifest = json.loads((Path(art) / "manifest.json").read_text())
            rec = {"artifact": art, **agreement(chat_answers(model, tok), reference),
                   "quant_config": manifest["quant_config"], "bpw": manifest["summary"]["bpw"]}
            records.append(rec)
        rec.update(forced_agreement(model, tok, reference))
        write_records(path, records)
        print(json.dumps({k: rec[k] for k in ("artifact", "rouge_l", "identical", "prompts", "forced_top1",
                                              "forced_nll")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
