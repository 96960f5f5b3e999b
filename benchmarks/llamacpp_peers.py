"""llama.cpp's own files for the same model, measured as PROTOCOL measures quipc's: the source GGUF
requantized by llama.cpp's quantizer to each type, its file size and whole-model bits per
parameter, and its perplexity computed by llama.cpp itself (the PROTOCOL windows, tokenized by
the model's tokenizer, each window one llama.cpp eval with every position's logits kept).
With --plot, file size against perplexity: these files beside quipc's whole-model records
(benchmarks/results/quality.json records that carry total_mb).

    python benchmarks/llamacpp_peers.py --threads 2 --json benchmarks/results/llamacpp_peers.json \\
        --plot benchmarks/results/size_vs_ppl.png

Needs llama-cpp-python (`pip install 'quipc[llamacpp]'`). Rerunning skips the types already
recorded in --json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
RESULTS = Path(__file__).resolve().parent / "results"


def gguf_params(path: Path) -> int:
    """Parameters stored in a GGUF file (each tensor's element count; a tied table once)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors))


def llamacpp_logits_fn(path: Path, threads: int, ctx: int):
    """(1, L) ids -> (L, vocab) logits of every position, by llama.cpp."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)

    def fn(ids):
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    return fn


def measure(src: Path, ftype: str, args, windows, work: Path) -> dict:
    from quipc.bench_llamacpp import requantize
    from quipc.eval.perplexity import perplexity
    from quipc.frontend.models import file_sha256

    path = src if ftype == "source" else requantize(src, file_sha256(src), ftype, work, args.threads)
    t0 = time.time()
    res = perplexity(llamacpp_logits_fn(path, args.threads, int(windows.shape[1])), windows, progress=True)
    size = path.stat().st_size
    params = gguf_params(src)
    return {"tool": "llama.cpp", "type": ftype, "file": path.name, "total_mb": round(size / 1e6, 3),
            "bits_per_param": round(size * 8 / params, 4), "params": params, "ppl": res["ppl"],
            "windows": int(windows.shape[0]), "threads": args.threads, "eval_seconds": round(time.time() - t0, 1)}


def plot(peers: list[dict], quality: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    ours = [r for r in quality if "total_mb" in r]
    colors = plt.get_cmap("tab10").colors
    for k, r in enumerate(sorted(ours, key=lambda r: (r["total_mb"], r["ppl"]))):
        # named in the legend (the 2-bit files sit within 1 MB of each other: labels would overlap)
        name = f"quipc w{r['bits']} {r.get('format', 'grid')}" + \
            (f" {r['calib']}" if r.get("calib") else "") + \
            (f" +{r['finetune']}" if r.get("finetune", "none") != "none" else "") + \
            (" (dense head)" if r.get("head_bits", 32) == 32 and r["bits"] < 32 else "") + \
            f": {r['total_mb']:.1f} MB, {r['ppl']:.2f}"
        ax.plot(r["total_mb"], r["ppl"], "os^Dv"[k // len(colors) % 5], color=colors[k % len(colors)], label=name)
    for r in peers:
        ax.plot(r["total_mb"], r["ppl"], "s", color="#cc7733")
        ax.annotate(f"llama.cpp {r['type']}", (r["total_mb"], r["ppl"]), fontsize=7, xytext=(4, -8),
                    textcoords="offset points")
    fp32 = [r for r in quality if r.get("method") == "fp32"]
    if fp32:
        ax.axhline(fp32[0]["ppl"], color="k", ls="--", lw=0.8, label=f"fp32 ({fp32[0]['ppl']:.2f}, 538 MB)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_yscale("log")
    ax.set_xlabel("file size, MB (everything a deployment loads, tokenizer apart)")
    ax.set_ylabel("WikiText-2 perplexity (PROTOCOL quick)")
    ax.set_title("SmolLM2-135M-Instruct: file size vs perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file or alias whose source is one")
    p.add_argument("--types", default="Q8_0,Q4_K_M,source,Q4_0",
                   help="llama.cpp file types; 'source' = the GGUF as shipped (default %(default)s)")
    p.add_argument("--text", default=str(SHARED / "wiki.test.raw"))
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/quipc-llamacpp-peers", help="where the requantized files go")
    p.add_argument("--json", required=True)
    p.add_argument("--quality", default=str(RESULTS / "quality.json"), help="quipc's records, for --plot")
    p.add_argument("--plot", default=None)
    args = p.parse_args()

    from quipc.eval.perplexity import eval_windows
    from quipc.frontend.hf import load_tokenizer
    from quipc.frontend.models import resolve

    src_model = resolve(args.model)
    if not src_model.gguf_file:
        raise SystemExit(f"{args.model} is not a GGUF model: llama.cpp needs one")
    src = src_model.folder / src_model.gguf_file
    out = Path(args.json)
    records = json.loads(out.read_text()) if out.exists() else []
    todo = [t for t in args.types.split(",") if t and t not in {r["type"] for r in records}]
    if todo:
        windows = eval_windows(load_tokenizer(src_model), args.text, 2048, args.windows)
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        for ftype in todo:
            rec = measure(src, ftype, args, windows, work)
            print(json.dumps(rec))
            records.append(rec)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1))
    if args.plot:
        quality = json.loads(Path(args.quality).read_text()) if Path(args.quality).exists() else []
        plot(records, quality, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
