"""Traced vs hand-written graphs (issue 11) in one interleaved `quipc bench` run: TVM (the
hand-written ONNX lowering was retired at stop 41 after this benchmark found the traced file as
fast; results files from before hold ONNX rows too, which `table` prints).

    python benchmarks/traced.py [--artifact ART] [--threads 2] [--reps 5]
        -> results/traced_vs_handwritten.json + a markdown table: decode ms/token, prefill ms,
           the export / build seconds of each graph (built fresh in --work), traced / hand-written
    python benchmarks/traced.py --small          # a functional check: 8-token prompt, 2 steps,
                                                 # 1 rep, nothing written to results/
    python benchmarks/traced.py table            # the table of the last results file

The artifact defaults to the CLI default SmolLM2 w2 (out/smollm2-w2-chat). Builds are made in
--work (default: a fresh temporary folder, so export seconds are measured every run).
Targets (issue 11): traced decode <= 1.1x the hand-written graph's ms/token in the same run;
export of SmolLM2 <= 3 minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "traced_vs_handwritten.json"
DEFAULT_ARTIFACT = ROOT / "out" / "smollm2-w2-chat"
BACKENDS = ("tvm-handwritten", "tvm-traced")   # the hand-written ONNX lowering was retired at stop 41
for p in (ROOT / "runtime", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def run(args) -> Path:
    from quipc import bench

    out = Path(args.json) if args.json else (Path(tempfile.mkdtemp()) / "traced.json" if args.small else RESULTS)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quipc-traced-bench-"))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = [str(args.artifact), "--backends", ",".join(BACKENDS), "--threads", str(args.threads),
            "--work", str(work), "--json", str(out)]
    argv += (["--reps", "1", "--prompt-len", "8", "--new-tokens", "2"] if args.small else
             ["--reps", str(args.reps), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)])
    bench.run(parser.parse_args(argv))
    print(table(out))
    return out


def table(path: Path = RESULTS) -> str:
    """Markdown: one row per backend and graph, the traced / hand-written ratios beside."""
    records = {r["backend"]: r for r in json.loads(Path(path).read_text())["records"]}
    lines = ["| backend | graph | decode ms/token | prefill ms | export / build s | traced / hand-written decode |",
             "|---|---|---|---|---|---|"]
    for target in [t for t in ("onnx", "tvm") if any(name.startswith(t) for name in records)]:
        hand, traced = records.get(f"{target}-handwritten", {}), records.get(f"{target}-traced", {})
        for graph, r in (("hand-written", hand), ("traced", traced)):
            if r.get("status") != "ok":
                lines.append(f"| {target} | {graph} | {r.get('status', 'absent')}: {r.get('reason', '')[:60]} | | | |")
                continue
            ratio = ""
            if graph == "traced" and hand.get("status") == "ok":
                ratio = f"{r['decode_ms'] / hand['decode_ms']:.2f}x"
            lines.append(f"| {target} | {graph} | {r['decode_ms']:.2f} | {r['prefill_ms']:.1f} | "
                         f"{r.get('build_s', '(reused)')} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=["run", "table"])
    ap.add_argument("--artifact", default=str(DEFAULT_ARTIFACT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", default=None, help="folder for the builds (default: a fresh temporary one)")
    ap.add_argument("--json", default=None, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--small", action="store_true", help="a functional check, not a measurement")
    args = ap.parse_args()
    if args.command == "table":
        print(table(Path(args.json) if args.json else RESULTS))
    else:
        run(args)


if __name__ == "__main__":
    main()
