"""Quality benchmark (PROTOCOL): perplexity, bpw and compile time of fp32 and of rtn /
ldlq / quip (hadamard, kron) at 4, 3, 2 bits, plus data-free calibration; code formats
(grid, e8p, trellis) and fine-tuning (none, e2e, all) side by side; with --agreement, the answer
agreement (ROUGE-L of greedy chat answers against fp32's, quipc.eval.agreement).

    python benchmarks/quality.py --windows 16 --json benchmarks/results/quality.json
    python benchmarks/quality.py --plot benchmarks/results/quality.png --json benchmarks/results/quality.json

Records are appended to the JSON as each run finishes; rerunning skips the runs already
recorded, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"

# (method, incoherence, calibration, format, fine-tuning, head bits) in the order they run; head
# bits 32 keeps lm_head and the embedding dense (so rows compare linears with linears), 4 is
# `quipc compile`'s default (one 4-bit table for a tied model); the last row is the CLI default.
RUNS = [("quip", "hadamard", "wikitext", "grid", "none", 32), ("ldlq", None, "wikitext", "grid", "none", 32),
        ("rtn", None, None, "grid", "none", 32), ("quip", "kron", "wikitext", "grid", "none", 32),
        ("quip", "hadamard", "generated", "grid", "none", 32),
        ("quip", "hadamard", "wikitext", "e8p", "none", 32), ("quip", "hadamard", "wikitext", "e8p", "e2e", 32),
        ("quip", "hadamard", "generated", "e8p", "none", 32), ("quip", "hadamard", "generated", "e8p", "e2e", 32),
        ("quip", "hadamard", "wikitext", "e8p", "all", 32),
        ("quip", "hadamard", "wikitext", "trellis", "none", 32), ("quip", "hadamard", "wikitext", "trellis", "all", 32),
        ("quip", "hadamard", "wikitext", "e8p", "e2e", 4), ("quip", "hadamard", "generated", "e8p", "e2e", 4)]


def key(rec: dict) -> tuple:
    return (rec["method"], rec.get("bits"), rec.get("incoherence"), rec.get("calib"),
            rec.get("format", "grid"), rec.get("finetune", "none"), rec.get("head_bits", 32))


def label(method, inc, cal, fmt, ft, head=32) -> str:
    """The --only name of a run: e.g. quip-hadamard, quip-hadamard-generated, quip-hadamard-e8p-e2e-head4."""
    return "-".join(x for x in (method, inc, cal if cal == "generated" else None,
                                fmt if fmt != "grid" else None, ft if ft != "none" else None,
                                f"head{head}" if head != 32 else None) if x)


def save(path: Path, record: dict) -> None:
    """Add one record, re-reading the file first: several runs may share it."""
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if key(r) != key(record)] + [record]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, path)


def eval_model(model, tokenizer, args) -> dict:
    from quipc.eval.perplexity import eval_windows, perplexity, torch_logits_fn

    windows = eval_windows(tokenizer, args.text, 2048, args.windows)
    return perplexity(torch_logits_fn(model), windows, progress=False)


def run_fp32(args) -> dict:
    from quipc.frontend.hf import load_model
    from quipc.frontend.models import resolve

    model, tok = load_model(resolve(args.model))
    r = eval_model(model, tok, args)
    return {"method": "fp32", "bits": 32, "incoherence": None, "calib": None, "ppl": r["ppl"],
            "bpw": 32.0, "compile_seconds": 0.0, "eval_seconds": r["seconds"], "windows": r["windows"]}


def fp32_answers(path: Path, args) -> list:
    """The fp32 model's greedy answers, computed once and cached beside the records
    (benchmarks/agreement.py's cache)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from agreement import fp32_answers as cached_answers

    return cached_answers(path.with_name(path.stem + "_fp32_answers.json"), args.model)


def add_agreement(rec: dict, model, tokenizer, reference: list) -> None:
    from quipc.eval.agreement import agreement, chat_answers

    result = agreement(chat_answers(model, tokenizer), reference)
    rec["agreement"] = result["rouge_l"]
    rec["identical_answers"] = result["identical"]


def run_quant(args, method, incoherence, calib, bits, fmt="grid", finetune="none", head=32) -> dict:
    import quipc_runtime
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig
    from quipc_runtime.loader import load_tokenizer

    name = f"{method}-w{bits}" + (f"-{incoherence}" if incoherence else "") + (f"-{calib}" if calib else "")
    name += (f"-{fmt}" if fmt != "grid" else "") + (f"-ft{finetune}" if finetune != "none" else "")
    name += f"-head{head}" if head != 32 else ""
    out = Path(args.artifacts) / name
    cfg = QuantConfig(method=method, bits=bits, incoherence=incoherence or "hadamard", format=fmt,
                      finetune=finetune, head_bits=head)
    cal = CalibConfig(text=str(args.calib) if calib == "wikitext" else None, windows=args.calib_windows)
    t0 = time.time()
    manifest = compile_model(args.model, out, cfg, cal, resume=True, progress=False)
    compile_s = time.time() - t0 if manifest.get("compile_seconds") is None else manifest["compile_seconds"]
    model = quipc_runtime.load(out)
    tok = load_tokenizer(out)
    r = eval_model(model, tok, args)
    rec = {"method": method, "bits": bits, "incoherence": incoherence, "calib": calib, "format": fmt,
           "finetune": finetune, "head_bits": head, "ppl": r["ppl"], "bpw": manifest["summary"]["bpw"],
           "total_mb": manifest["summary"]["total_bytes"] / 1e6,
           "compile_seconds": compile_s, "eval_seconds": r["seconds"], "windows": r["windows"],
           "artifact": str(out), "threads": torch.get_num_threads()}
    if manifest.get("finetune"):
        rec["finetune_seconds"] = manifest["finetune"]["seconds"]
    if args.agreement:
        add_agreement(rec, model, tok, fp32_answers(Path(args.json), args))
    return rec


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = [r for r in records if r["method"] == "fp32"]
    groups: dict[str, list] = {}
    for r in records:
        if r["method"] != "fp32":
            name = r["method"] + (f" {r['incoherence']}" if r["incoherence"] else "") + \
                (f" {r['format']}" if r.get("format", "grid") != "grid" else "") + \
                (f" +ft {r['finetune']}" if r.get("finetune", "none") != "none" else "") + \
                (f" ({'data-free' if r['calib'] == 'generated' else r['calib']})"
                 if str(r["calib"]).startswith("generated") else "") + \
                (f" head {r['head_bits']}-bit" if r.get("head_bits", 32) != 32 else "")
            groups.setdefault(name, []).append(r)
    # The y axis stops at TOP: a point above it (rtn at 2 bits) is drawn on the edge and its value
    # named in the legend, so that it does not squash every other row into the bottom tenth.
    top = 1000.0
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("tab20").colors
    for k, (name, rs) in enumerate(sorted(groups.items())):
        rs.sort(key=lambda r: r["bpw"])
        off = [r for r in rs if r["ppl"] > top]
        label = name + "".join(f" ({r['bits']}-bit: {r['ppl']:.3g}, off scale)" for r in off)
        ax.plot([r["bpw"] for r in rs], [min(r["ppl"], top) for r in rs], "os^Dv"[k % 5],
                ls="-" if k < len(colors) else "--", color=colors[k % len(colors)], label=label, ms=5)
    if fp32:
        ax.axhline(fp32[0]["ppl"], color="k", ls="--", label=f"fp32 ({fp32[0]['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1.05)
    ax.set_xlabel("bits per weight (quantized linears)")
    ax.set_ylabel("WikiText-2 perplexity (PROTOCOL quick)")
    ax.set_title("SmolLM2-135M: perplexity vs bpw")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(records: list[dict]) -> str:
    rows = ["| method | transform | calibration | format | fine-tune | head | bits | bpw | ppl | agreement | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (-r["bits"], r["method"], str(r["incoherence"]), str(r["calib"]),
                                            r.get("format", "grid"), r.get("finetune", "none"))):
        agree = f"{r['agreement']:.3f}" if "agreement" in r else "-"
        secs = "-" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.0f}"
        rows.append(f"| {r['method']} | {r['incoherence'] or '-'} | {r['calib'] or '-'} | "
                    f"{r.get('format', 'grid') if r['method'] != 'fp32' else '-'} | {r.get('finetune', 'none')} | "
                    f"{r.get('head_bits', 32)} | "
                    f"{r['bits']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {agree} | {secs} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--json", required=True)
    p.add_argument("--text", default=str(SHARED / "wiki.test.raw"))
    p.add_argument("--calib", default=str(SHARED / "wiki.valid.tokens"))
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--bits", default="4,3,2")
    p.add_argument("--only", help="comma list of run labels: fp32, quip-hadamard, ldlq, rtn, quip-kron, "
                                  "quip-hadamard-generated, quip-hadamard-e8p, quip-hadamard-e8p-e2e, "
                                  "quip-hadamard-generated-e8p, quip-hadamard-generated-e8p-e2e, quip-hadamard-e8p-all, "
                                  "quip-hadamard-trellis, quip-hadamard-trellis-all, "
                                  "quip-hadamard-e8p-e2e-head4, quip-hadamard-generated-e8p-e2e-head4 (the CLI default)")
    p.add_argument("--agreement", action="store_true",
                   help="also score greedy chat answers against fp32's (ROUGE-L over token ids)")
    p.add_argument("--artifacts", default="benchmarks/artifacts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", help="only draw the PNG from the JSON")
    p.add_argument("--markdown", action="store_true", help="only print the JSON as a table")
    args = p.parse_args()
    path = Path(args.json)
    records = json.loads(path.read_text()) if path.exists() else []
    if args.plot or args.markdown:
        if args.plot:
            plot(records, Path(args.plot))
        if args.markdown:
            print(markdown(records))
        return 0
    torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    done = {key(r) for r in records}
    todo = [("fp32", None, None, "grid", "none", 32, 32)] + [
        (m, inc, cal, fmt, ft, head, b) for m, inc, cal, fmt, ft, head in RUNS for b in map(int, args.bits.split(","))]
    for method, inc, cal, fmt, ft, head, bits in todo:
        rec_key = (method, bits, inc, cal, fmt, ft, head)
        if rec_key in done or (only and label(method, inc, cal, fmt, ft, head) not in only):
            continue
        rec = run_fp32(args) if method == "fp32" else run_quant(args, method, inc, cal, bits, fmt, ft, head)
        save(path, rec)
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
