"""What the defaults give: the README's "At a glance" table and its size-against-perplexity plot.

    python benchmarks/defaults.py [--plot benchmarks/results/defaults_size_vs_ppl.png]

Reads benchmarks/results/defaults.json (one row per default compile: its size from the artifact's
manifest summary, and the names of its evaluation and answer-agreement records), takes perplexity
and ROUGE-L from those records, prints the markdown table, and with --plot draws the rows beside
llama.cpp's files of the same model (benchmarks/results/llamacpp_peers.json) and fp32. A row whose
record is missing or names no such artifact is an error, not a blank.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _record(name: str) -> dict | list:
    path = RESULTS / name
    if not path.is_file():
        raise SystemExit(f"defaults.json names {name}, which is not in {RESULTS}")
    return json.loads(path.read_text())


def _rouge(agreement: list | None) -> float | None:
    if agreement is None:
        return None
    name, artifact = agreement
    rows = [r for r in _record(name) if Path(r["artifact"]).name == artifact]
    if len(rows) != 1:
        raise SystemExit(f"{name} holds no single row for artifact {artifact!r}")
    return rows[0]["rouge_l"]


def rows(table: dict) -> list[dict]:
    out = []
    for row in table["rows"]:
        out.append(dict(row, ppl=_record(row["eval"])["ppl"], rouge_l=_rouge(row["agreement"])))
    return out


def markdown(table: dict, measured: list[dict]) -> str:
    lines = ["| compile | blocks | folder MB | bits/param | ppl | ROUGE-L | France | measured |",
             "|---|---|---|---|---|---|---|---|",
             f"| fp32 (the source model) | - | {table['fp32']['total_mb']:.0f} | 32 | {table['fp32']['ppl']:.2f} | 1.0 "
             "| Paris | |"]
    for r in measured:
        calib = " --calib wiki.valid.tokens`" if r["calib"] != "data-free" else "` (data-free)"
        flag = f"`--bits {r['bits']}" + calib
        rouge = "-" if r["rouge_l"] is None else f"{r['rouge_l']:.3f}"
        lines.append(f"| {flag} | {r['blocks']} | {r['total_mb']:.2f} | {r['bits_per_param']:.3f} | {r['ppl']:.2f} "
                     f"| {rouge} | {r['france']} | {r['host']}, stop {r['stop']} |")
    return "\n".join(lines)


def plot(table: dict, measured: list[dict], peers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for calib, marker, color in (("data-free", "o", "#3366aa"), ("wikitext", "D", "#229955")):
        mine = [r for r in measured if r["calib"] == calib]
        ax.plot([r["total_mb"] for r in mine], [r["ppl"] for r in mine], marker, color=color, ls="none",
                label=f"quipc, {'data-free' if calib == 'data-free' else '--calib wiki.valid.tokens'}")
        for r in mine:
            ax.annotate(f"w{r['bits']} {r['blocks']} ({r['host'].split()[-1]})", (r["total_mb"], r["ppl"]),
                        fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.plot([p["total_mb"] for p in peers], [p["ppl"] for p in peers], "s", color="#cc7733", ls="none",
            label="llama.cpp")
    for p in peers:
        name = "Q4_1 (the source GGUF)" if p["type"] == "source" else p["type"]
        ax.annotate(name, (p["total_mb"], p["ppl"]), fontsize=7, xytext=(4, -8), textcoords="offset points")
    fp32 = table["fp32"]
    ax.axhline(fp32["ppl"], color="k", ls="--", lw=0.8, label=f"fp32 ({fp32['ppl']:.2f}, {fp32['total_mb']:.0f} MB)")
    ax.set_yscale("log")
    ax.set_xlabel("file size, MB (everything a deployment loads, tokenizer apart)")
    ax.set_ylabel("WikiText-2 perplexity (PROTOCOL quick)")
    ax.set_title("SmolLM2-135M-Instruct: quipc's defaults beside llama.cpp's files")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=str(RESULTS / "defaults.json"))
    p.add_argument("--peers", default=str(RESULTS / "llamacpp_peers.json"))
    p.add_argument("--plot", default=None, help="write the size-against-perplexity plot here")
    args = p.parse_args()
    table = json.loads(Path(args.table).read_text())
    measured = rows(table)
    print(markdown(table, measured))
    if args.plot:
        plot(table, measured, json.loads(Path(args.peers).read_text()), Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
