"""`quipc bench ARTIFACT`: prefill / decode latency, tokens/s and peak memory across backends.

Each backend runs in its own worker process (so its peak memory is its own), all loaded before
timing starts; the parent then runs the repetitions interleaved (rep 1 of every backend, then
rep 2, ...) after one warm-up each, so drifts of a shared machine hit all backends alike.
One repetition = prefill of a fixed prompt (timed) + `--new-tokens` greedy decode steps with
the KV cache (timed; decode_ms = their total / count). Reported: median over repetitions and
the spread (min, max). A backend that cannot run here is reported as skipped with the reason.

Backends: torch-ref (quipc_runtime, reference modules), runtime (quipc_runtime C++ kernels as `quipc
chat` runs them: int8 activations, decoded by the lean decoder where it runs the family;
runtime-transformers: fp32 activations, through transformers), onnx (quipc ONNX export +
onnxruntime), tvm (quipc TVM build, llvm); baselines (--baseline
fp32,llamacpp): fp32-torch (transformers, the original fp32 model), fp32-onnx (its ONNX export,
onnxruntime); llamacpp-q4_0 / llamacpp-q8_0 (the source GGUF requantized by llama.cpp, run by
llama-cpp-python where installed: bench_llamacpp.py).

This module drives a run (arguments, repetitions, records); bench_backends.py names the
backends and prepares them, bench_worker.py is the worker process, bench_report.py the table
and chart.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from .bench_backends import BASELINES, KNOWN_BACKENDS, QUIPC_BACKENDS, prepare
from .bench_llamacpp import LLAMACPP_TYPES
from .bench_backends import why_not as _why_not  # called through this name: tests patch it here
from .bench_report import format_table, write_chart
from .bench_worker import worker

# Pause before each timed run: the previous backend's idle thread pools (onnxruntime, TVM,
# OpenMP) spin for a while after their last region and would steal the cores.
SETTLE_S = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="a quipc artifact folder")
    parser.add_argument("--backends", default=",".join(QUIPC_BACKENDS),
                        help=f"comma-separated, from {', '.join(KNOWN_BACKENDS)} "
                             f"(default: {', '.join(QUIPC_BACKENDS)})")
    parser.add_argument("--baseline", default=None, type=_baselines,
                        help="comma-separated: fp32 = the unquantized model in transformers and onnxruntime; "
                             "llamacpp = the source GGUF requantized by llama.cpp to Q4_0 and Q8_0 "
                             "(needs llama-cpp-python)")
    parser.add_argument("--gguf", default=None,
                        help="llamacpp baseline: the GGUF file to requantize (default: the artifact's source, "
                             "when it was a .gguf file)")
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


def _baselines(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BASELINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {bad or text!r}; expected some of "
                                         f"{', '.join(sorted(BASELINES))}")
    return names


def _summary(samples: list[dict], key: str) -> tuple[float, list[float]]:
    vals = [s[key] for s in samples]
    return statistics.median(vals), [min(vals), max(vals)]


def _bits_label(name: str, bits) -> str | int | None:
    """What a record's bits column says: the artifact's bits, None for fp32, llama.cpp's type."""
    if name.startswith("fp32"):
        return None
    return LLAMACPP_TYPES.get(name, bits)


def died(name: str, exitcode, when: str) -> str:
    """The reason recorded for a backend whose process died: a signal (negative exit code) is a
    crash in native code; for llama.cpp, one seen on an AMX host (its AMX build crashes where the
    OS does not grant AMX tiles) says how to build it without."""
    msg = f"the worker process died {when} (exit code {exitcode})"
    if name.startswith("llamacpp") and exitcode is not None and exitcode < 0:
        msg += ("; a crash inside llama.cpp: on an AMX CPU, try llama-cpp-python built without AMX "
                "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF "
                "-DGGML_AMX_INT8=OFF\" pip install --no-binary llama-cpp-python llama-cpp-python)")
    return msg


def run(args) -> int:
    from quipc_runtime import artifact as art

    artifact = Path(args.artifact)
    manifest = art.read_manifest(artifact)  # raises a clear error for a bad folder
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in KNOWN_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; expected some of {', '.join(KNOWN_BACKENDS)}")
    for baseline in args.baseline or []:
        names += [b for b in BASELINES[baseline] if b not in names]
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
            "source": manifest.get("source"), "threads": threads,
            "prompt": prompt, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "onnx_custom_ops": not args.no_onnx_custom_ops}

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    t_start = time.time()
    records: dict[str, dict] = {}
    workers: dict[str, tuple] = {}
    build_s: dict[str, float] = {}
    files: dict[str, dict] = {}
    ctx = mp.get_context("spawn")
    for name in names:
        spec = dict(base)
        reason = _why_not(name) or prepare(name, spec, args, work, log)
        if "build_s" in spec:
            build_s[name] = spec["build_s"]
        if "file_mb" in spec:   # a llama.cpp baseline: the file it runs, requantized from source_file
            files[name] = {"file": spec["file"], "source_file": spec["source_file"], "file_mb": spec["file_mb"]}
        if reason is None and name.startswith("fp32") and not spec["source_spec"]:
            reason = "the artifact does not record its source model"
        if reason:
            records[name] = {"backend": name, "status": "skipped", "reason": reason}
            log(f"{name}: skipped: {reason}")
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, spec, threads, child), daemon=True)
        proc.start()
        child.close()   # the worker's end lives in the worker only: its death reads as EOF here
        try:
            kind, info = parent.recv()
        except (EOFError, OSError):
            proc.join(5)
            kind, info = "error", died(name, proc.exitcode, "while loading")
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
                kind, res = "error", died(name, proc.exitcode, "in a repetition")
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
            "backend": name, "status": "ok", "bits": _bits_label(name, bits),
            "threads": threads, "prefill_ms": round(pre, 3), "decode_ms": round(dec, 3),
            "tok_s": round(1e3 / dec, 2), "peak_mb": round(max(x["peak_mb"] for x in s), 1),
            "reps": len(s), "spread": {"prefill_ms": [round(v, 3) for v in pre_sp],
                                       "decode_ms": [round(v, 3) for v in dec_sp]},
            "rss_before_load_mb": round(info["rss_before_load_mb"], 1),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        }
        if name in build_s:   # the ONNX export / TVM build made for this run
            records[name]["build_s"] = build_s[name]
        records[name].update(files.get(name, {}))
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
