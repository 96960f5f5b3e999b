"""`quipc bench ARTIFACT`: prefill / decode latency, tokens/s and peak memory across backends.

Each backend runs in its own worker process (so its peak memory is its own), all loaded before
timing starts; the parent then runs the repetitions interleaved (rep 1 of every backend, then
rep 2, ...) after one warm-up each, so drifts of a shared machine hit all backends alike.
One repetition = prefill of a fixed prompt (timed) + `--new-tokens` greedy decode steps with
the KV cache (timed; decode_ms = their total / count). Reported: median over repetitions and
the spread (min, max). A backend that cannot run here is reported as skipped with the reason.

Backends: torch-ref (quipc_runtime, reference modules), runtime (quipc_runtime C++ kernels),
onnx (quipc ONNX export + onnxruntime), tvm (quipc TVM build, llvm); baselines (--baseline fp32):
fp32-torch (transformers, the original fp32 model), fp32-onnx (its ONNX export, onnxruntime).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

QUIPC_BACKENDS = ("torch-ref", "runtime", "onnx", "tvm")
# onnx / tvm lower with the artifact's default graph (backends/lower.py: hand-written for llama,
# traced otherwise); these name the graph, to put both side by side (not in the default list)
GRAPH_BACKENDS = {"onnx-traced": ("onnx", "traced"), "onnx-handwritten": ("onnx", "handwritten"),
                  "tvm-traced": ("tvm", "traced"), "tvm-handwritten": ("tvm", "handwritten")}
# Pause before each timed run: the previous backend's idle thread pools (onnxruntime, TVM,
# OpenMP) spin for a while after their last region and would steal the cores.
SETTLE_S = 0.2
BASELINES = {"fp32": ("fp32-torch", "fp32-onnx")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="a quipc artifact folder")
    parser.add_argument("--backends", default=",".join(QUIPC_BACKENDS),
                        help=f"comma-separated, from {', '.join(QUIPC_BACKENDS + tuple(GRAPH_BACKENDS))} "
                             f"(default: {', '.join(QUIPC_BACKENDS)})")
    parser.add_argument("--baseline", default=None, choices=sorted(BASELINES),
                        help="also measure the unquantized model: fp32 = transformers fp32 + onnxruntime fp32")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for prefill (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per repetition (default 32)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per backend (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every backend (default: QUIPC_NUM_THREADS or all cores)")
    parser.add_argument("--work", default=None,
                        help="folder for the ONNX/TVM builds the benchmark needs (default: ARTIFACT/../.bench-<name>); "
                             "reused when present")
    parser.add_argument("--tvm-build", default=None, help="use this existing TVM build instead of compiling one")
    parser.add_argument("--onnx-build", default=None, help="use this existing ONNX export instead of exporting")
    parser.add_argument("--no-onnx-custom-ops", action="store_true",
                        help="onnx: run the quipc nodes' function bodies (stock onnxruntime) instead of "
                             "quipc's onnxruntime custom-op library")
    parser.add_argument("--json", default=None, help="write one record per backend to this JSON file")
    parser.add_argument("--png", default=None, help="write a chart (default: next to --json)")
    parser.add_argument("--seed", type=int, default=0)


# --- backends (run inside the worker processes) --------------------------------------------
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


class TvmDriver:
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
    if name in ("torch-ref", "runtime"):
        import quipc_runtime

        model = quipc_runtime.load(art, backend="reference" if name == "torch-ref" else "kernels")
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

        return TvmDriver(TvmLM(spec["tvm_path"], threads=threads), spec["prompt_len"] + spec["new_tokens"] + 1)
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


def _worker(name: str, spec: dict, threads: int, conn) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["TVM_NUM_THREADS"] = os.environ["QUIPC_NUM_THREADS"] = str(threads)
    try:
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


# --- preparation (parent) ---------------------------------------------------------------------
def _why_not(name: str) -> str | None:
    """The reason a backend cannot run here, or None."""
    import importlib.util

    if name in ("onnx", "fp32-onnx") or name.startswith("onnx-"):
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if importlib.util.find_spec("onnx") is None:
            return "onnx is not installed"
    if (name == "tvm" or name.startswith("tvm-")) and importlib.util.find_spec("tvm") is None:
        return "apache-tvm is not installed"
    if name == "runtime":
        try:
            from quipc_runtime import kernels
        except ImportError as e:
            return f"quipc_runtime.kernels is not importable: {e}"
        if not kernels.available():
            return f"the C++ kernels are not built ({kernels._IMPORT_ERROR})"
    return None


def _prepare(name: str, spec: dict, args, work: Path, log) -> str | None:
    """Build what a backend needs (ONNX export, TVM compile), cached in `work`."""
    art = Path(spec["artifact"])
    try:
        if name in ("onnx", "tvm") or name in GRAPH_BACKENDS:
            target, graph = GRAPH_BACKENDS.get(name, (name, "auto"))
            given = {"onnx": args.onnx_build, "tvm": args.tvm_build}.get(name)
            path = Path(given) if given else work / {"onnx": "onnx-quip", "tvm": "tvm-llvm"}.get(name, name)
            done = path / ("model.onnx" if target == "onnx" else "tvm_config.json")
            if not done.is_file():
                from quipc.backends.lower import lower_artifact

                log(f"lowering {art} to {target} ({graph} graph, {path})")
                t0 = time.time()
                lower_artifact(art, path, target=target, graph=graph, onnx_ops="quip", progress=False)
                spec["build_s"] = round(time.time() - t0, 1)
            spec["onnx_path" if target == "onnx" else "tvm_path"] = str(path)
        elif name == "fp32-onnx":
            path = work / "onnx-fp32"
            if not (path / "model.onnx").is_file():
                from quipc.backends.onnx.export import export_hf_model
                from quipc.frontend.hf import load_model
                from quipc.frontend.models import resolve

                log(f"exporting the fp32 model to ONNX ({path})")
                model, tok = load_model(resolve(spec["source_spec"]))
                export_hf_model(model.eval(), path, tokenizer=tok)
            spec["onnx_path"] = str(path)
    except Exception as e:
        return f"could not prepare: {type(e).__name__}: {e}"[:500]
    return None


def _summary(samples: list[dict], key: str) -> tuple[float, list[float]]:
    vals = [s[key] for s in samples]
    return statistics.median(vals), [min(vals), max(vals)]


def run(args) -> int:
    from quipc_runtime import artifact as art

    artifact = Path(args.artifact)
    manifest = art.read_manifest(artifact)  # raises a clear error for a bad folder
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in QUIPC_BACKENDS and b not in GRAPH_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; expected some of "
                         f"{', '.join(QUIPC_BACKENDS + tuple(GRAPH_BACKENDS))}")
    if args.baseline:
        names += list(BASELINES[args.baseline])
    if args.reps < 1 or args.new_tokens < 1 or args.prompt_len < 1:
        raise ValueError("--reps, --new-tokens and --prompt-len must be >= 1")
    threads = args.threads or int(os.environ.get("QUIPC_NUM_THREADS", 0)) or os.cpu_count() or 1
    work = Path(args.work) if args.work else artifact.resolve().parent / f".bench-{artifact.resolve().name}"
    work.mkdir(parents=True, exist_ok=True)
    bits = manifest.get("quant_config", {}).get("bits")
    vocab = int(manifest["model_config"]["vocab_size"])
    import random

    rng = random.Random(args.seed)
    prompt = [rng.randrange(min(vocab, 32000)) for _ in range(args.prompt_len)]
    base = {"artifact": str(artifact.resolve()), "source_spec": manifest.get("source", {}).get("spec"),
            "prompt": prompt, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "onnx_custom_ops": not args.no_onnx_custom_ops}

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    t_start = time.time()
    records: dict[str, dict] = {}
    workers: dict[str, tuple] = {}
    build_s: dict[str, float] = {}
    ctx = mp.get_context("spawn")
    for name in names:
        spec = dict(base)
        reason = _why_not(name) or _prepare(name, spec, args, work, log)
        if "build_s" in spec:
            build_s[name] = spec["build_s"]
        if reason is None and name.startswith("fp32") and not spec["source_spec"]:
            reason = "the artifact does not record its source model"
        if reason:
            records[name] = {"backend": name, "status": "skipped", "reason": reason}
            log(f"{name}: skipped: {reason}")
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(name, spec, threads, child), daemon=True)
        proc.start()
        kind, info = parent.recv()
        if kind != "ready":
            records[name] = {"backend": name, "status": "skipped", "reason": info}
            log(f"{name}: skipped: {info}")
            proc.join(5)
            continue
        workers[name] = (proc, parent, info)
        log(f"{name}: loaded (rss {info['rss_loaded_mb']:.0f} MiB)")
    samples: dict[str, list[dict]] = {n: [] for n in workers}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, (proc, conn, _) in list(workers.items()):
            time.sleep(SETTLE_S)
            try:
                conn.send("run")
                kind, res = conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                proc.join(5)
                kind, res = "error", f"the worker process died (exit code {proc.exitcode})"
            if kind != "ok":
                records[name] = {"backend": name, "status": "failed", "reason": res}
                log(f"{name}: failed: {res}")
                try:
                    conn.send("stop")
                except (OSError, BrokenPipeError):
                    pass
                del workers[name]
                continue
            if rep > 0:
                samples[name].append(res)
        log(f"repetition {rep}/{args.reps} done" + (" (warm-up)" if rep == 0 else ""))
    for name, (proc, conn, info) in workers.items():
        conn.send("stop")
        proc.join(10)
        s = samples[name]
        pre, pre_sp = _summary(s, "prefill_ms")
        dec, dec_sp = _summary(s, "decode_ms")
        records[name] = {
            "backend": name, "status": "ok", "bits": None if name.startswith("fp32") else bits,
            "threads": threads, "prefill_ms": round(pre, 3), "decode_ms": round(dec, 3),
            "tok_s": round(1e3 / dec, 2), "peak_mb": round(max(x["peak_mb"] for x in s), 1),
            "reps": len(s), "spread": {"prefill_ms": [round(v, 3) for v in pre_sp],
                                       "decode_ms": [round(v, 3) for v in dec_sp]},
            "rss_before_load_mb": round(info["rss_before_load_mb"], 1),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        }
        if name in build_s:   # the ONNX export / TVM build made for this run
            records[name]["build_s"] = build_s[name]
    ordered = [records[n] for n in names if n in records]
    meta = {"artifact": str(artifact.resolve()), "threads": threads, "reps": args.reps,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "cpu_count": os.cpu_count(),
            "onnx_custom_ops": not args.no_onnx_custom_ops, "seconds": round(time.time() - t_start, 1),
            "statistic": "median over reps; spread = [min, max]; interleaved; 1 warm-up rep each",
            "peak_mb": "peak RSS of the backend's own worker process (interpreter and libraries included)"}
    print(format_table(ordered, meta))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "records": ordered}, indent=1))
        png = Path(args.png) if args.png else out.with_suffix(".png")
        why = write_chart(ordered, meta, png)
        print(f"wrote {out}" + (f" and {png}" if why is None else f" (no chart: {why})"))
    elif args.png:
        why = write_chart(ordered, meta, Path(args.png))
        if why:
            print(f"no chart: {why}")
    return 0


def format_table(records: list[dict], meta: dict) -> str:
    lines = [f"threads={meta['threads']}  reps={meta['reps']} (median, [min-max])  "
             f"prompt={meta['prompt_len']} tokens  decode={meta['new_tokens']} tokens",
             f"{'backend':<11} {'bits':>4} {'prefill ms':>22} {'decode ms/token':>22} {'tok/s':>7} {'peak MiB':>9}"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<11} {r['status']}: {r['reason']}")
            continue
        p, d = r["spread"]["prefill_ms"], r["spread"]["decode_ms"]
        lines.append(f"{r['backend']:<11} {str(r['bits'] or 'fp32'):>4} "
                     f"{r['prefill_ms']:>8.1f} [{p[0]:.1f}-{p[1]:.1f}]".ljust(40)
                     + f"{r['decode_ms']:>8.2f} [{d[0]:.2f}-{d[1]:.2f}]".rjust(23)
                     + f" {r['tok_s']:>7.1f} {r['peak_mb']:>9.0f}")
    return "\n".join(lines)


def write_chart(records: list[dict], meta: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return "no backend ran"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "decode_ms", "decode, ms per token"),
                           (axes[1], "prefill_ms", f"prefill of {meta['prompt_len']} tokens, ms")):
        names = [r["backend"] for r in ok]
        vals = [r[key] for r in ok]
        lo = [r[key] - r["spread"][key][0] for r in ok]
        hi = [r["spread"][key][1] - r[key] for r in ok]
        colors = ["#999999" if n.startswith("fp32") else "#3366aa" for n in names]
        ax.bar(names, vals, yerr=[lo, hi], capsize=4, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{Path(meta['artifact']).name}: {meta['threads']} threads, median of {meta['reps']} "
                 "interleaved reps, bars = min-max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
