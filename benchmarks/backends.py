"""Benchmarks of quipc's backends (TVM in particular). Not tests: they take minutes.

    python benchmarks/backends.py bench  [--bits 2 3 4]   # `quipc bench` per artifact -> results/backends_w*.json|png
    python benchmarks/backends.py ppl    [--bits 2]       # TVM vs torch-path perplexity (PROTOCOL quick)
    python benchmarks/backends.py kernel                  # TIR dequant-matmul (fp32 / int8 activations) vs the C++ kernel

TVM's CUDA builds for a GPU machine: benchmarks/tvm_gpu.py.

Artifacts default to /work/artifacts/smollm2-quip-w{bits}; threads to 2 (this machine).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
for p in (ROOT / "runtime", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def artifact_for(bits: int, given: str | None) -> Path:
    return Path(given) if given else Path(f"/work/artifacts/smollm2-quip-w{bits}")


# --- quipc bench across backends -----------------------------------------------------------
def cmd_bench(args) -> None:
    from quipc import bench

    for bits in args.bits:
        art = artifact_for(bits, args.artifact if len(args.bits) == 1 else None)
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        argv = [str(art), "--backends", "torch-ref,runtime,onnx,tvm", "--threads", str(args.threads),
                "--reps", str(args.reps), "--prompt-len", str(args.prompt_len),
                "--new-tokens", str(args.new_tokens), "--json", str(RESULTS / f"backends_w{bits}.json")]
        if args.baseline:
            argv += ["--baseline", "fp32"]
        t0 = time.time()
        bench.run(parser.parse_args(argv))
        print(f"w{bits}: {time.time() - t0:.0f} s")
    table()


def table() -> None:
    """Markdown table of every results/backends_w*.json (for the README)."""
    rows = []
    for path in sorted(RESULTS.glob("backends_w*.json")):
        data = json.loads(path.read_text())
        meta = data["meta"]
        fp32 = {r["backend"]: r for r in data["records"] if r["status"] == "ok"}.get("fp32-onnx")
        for r in data["records"]:
            if r["status"] != "ok":
                rows.append(f"| {path.stem[-2:]} | {r['backend']} | {r['status']}: {r['reason'][:60]} | | | | |")
                continue
            ratio = f"{r['decode_ms'] / fp32['decode_ms']:.2f}x" if fp32 else "-"
            d = r["spread"]["decode_ms"]
            p = r["spread"]["prefill_ms"]
            rows.append(f"| {path.stem[-2:] if not r['backend'].startswith('fp32') else 'fp32'} | {r['backend']} | "
                        f"{r['decode_ms']:.1f} [{d[0]:.1f}-{d[1]:.1f}] | {ratio} | "
                        f"{r['prefill_ms']:.0f} [{p[0]:.0f}-{p[1]:.0f}] | {r['tok_s']:.1f} | {r['peak_mb']:.0f} |")
        print(f"\n{path.name}: threads={meta['threads']}, reps={meta['reps']} (median [min-max], interleaved), "
              f"prompt {meta['prompt_len']}, decode {meta['new_tokens']} tokens")
    print("| bits | backend | decode ms/token | vs fp32 ONNX | prefill ms | tok/s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


# --- perplexity agreement ------------------------------------------------------------------
def cmd_ppl(args) -> None:
    import torch

    import quipc_runtime
    from quipc.eval.perplexity import eval_windows, perplexity, torch_logits_fn
    from quipc_runtime.loader import load_tokenizer
    from quipc_runtime.tvm_runtime import TvmLM

    torch.set_num_threads(args.threads)
    for bits in args.bits:
        art = artifact_for(bits, args.artifact if len(args.bits) == 1 else None)
        build = Path(args.work) / f"tvm-w{bits}-{art.resolve().name}"
        if not (build / "tvm_config.json").is_file():
            from quipc.backends.tvm import compile_artifact

            compile_artifact(art, build, progress=True)
        windows = eval_windows(load_tokenizer(art), TEXT, 2048, args.windows)
        lm = TvmLM(build, threads=args.threads)
        res_tvm = perplexity(lambda ids: lm.logits(ids[0].numpy()), windows, progress=True)
        del lm
        res = {"artifact": str(art.resolve()), "bits": bits, "threads": args.threads, "windows": args.windows,
               "ctx": 2048, "text": str(TEXT), "tvm": res_tvm}
        if not args.skip_torch:
            model = quipc_runtime.load(art)
            res["torch"] = perplexity(torch_logits_fn(model), windows, progress=True)
            del model
            res["rel_diff"] = res_tvm["ppl"] / res["torch"]["ppl"] - 1
        tag = "" if args.artifact is None else "_" + art.resolve().name
        out = RESULTS / f"tvm_ppl_w{bits}{tag}_{args.windows}win.json"
        out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k in ("bits", "rel_diff")}),
              "tvm", round(res_tvm["ppl"], 4), "torch", round(res.get("torch", {}).get("ppl", float("nan")), 4))


# --- the kernel alone --------------------------------------------------------------------------
def random_layer(m, n, bits, seed=0, kind="hadamard"):
    import numpy as np

    from quipc_runtime.layer import QuantizedLinear
    from quipc_runtime.packing import pack
    from quipc_runtime.transforms import Transform

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (m, n))
    return QuantizedLinear("bench", m, n, bits, pack(codes, bits), rng.normal(0, .02, m).astype(np.float16),
                           rng.normal(0, .02, m).astype(np.float16), Transform.make(kind, n, seed + 1),
                           Transform.make(kind, m, seed + 2))


def _tvm_gemv(spec, number: int):
    """(the compiled decode kernel of `spec` as a callable module, its time_evaluator)."""
    import tvm

    from quipc.backends.tvm.build import resolve_target
    from quipc.backends.tvm.lowering import linear_prim_func
    from quipc.backends.tvm.schedules import schedule_func

    lib = tvm.compile(schedule_func(linear_prim_func(spec, "gemv")).with_attr("global_symbol", "main"),
                      target=resolve_target("llvm"))
    f = lib.jit() if hasattr(lib, "jit") else lib
    return f, f.time_evaluator("main", tvm.cpu(), number=number, repeat=1)


def cmd_kernel(args) -> None:
    import statistics

    import numpy as np
    import tvm

    from quipc.backends.tvm import gemv_i8
    from quipc.backends.tvm import tir_quip_linear as Q
    from quipc.backends.tvm.build import resolve_target

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    records = []
    for (m, n) in args.shapes:
        for bits in args.kbits:
            layer = random_layer(m, n, bits)
            spec = Q.LinearSpec.of(layer)
            x = np.random.default_rng(1).normal(size=(1, n)).astype(np.float32)
            p = Q.linear_params(layer, spec)
            targs = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(p[k]) for k in Q.param_names(spec)]
            y = tvm.runtime.empty((1, m), "float32", tvm.cpu())
            f, ev = _tvm_gemv(spec, args.number)
            # the same layer's GEMV on int8 activations (gemv_i8), where the CPU and the bits allow
            int8 = gemv_i8.for_decode(spec, gemv_i8.supported(resolve_target("llvm")))
            f8, ev8 = _tvm_gemv(int8, args.number) if int8.int8_acts else (None, None)
            rec = {"shape": [m, n], "bits": bits, "batch": 1, "threads": args.threads,
                   "transform": "hadamard " + str(spec.in_orders)}
            cpp = None
            try:
                from quipc_runtime import kernels

                if kernels.available():
                    plan = kernels.prepare(layer)
                    kernels.quip_linear(plan, x, threads=args.threads)
                    cpp = plan
                else:
                    rec["cpp"] = f"skipped: {kernels._IMPORT_ERROR}"
            except ImportError as e:
                rec["cpp"] = f"skipped: {e}"
            tvm_ms, cpp_ms, i8_ms = [], [], []
            for _ in range(args.reps):  # interleaved
                tvm_ms.append(ev(*targs, y).mean * 1e3)
                if ev8 is not None:
                    i8_ms.append(ev8(*targs, y).mean * 1e3)
                if cpp is not None:
                    t0 = time.perf_counter()
                    for _ in range(args.number):
                        kernels.quip_linear(cpp, x, threads=args.threads)
                    cpp_ms.append((time.perf_counter() - t0) / args.number * 1e3)
            from quipc_runtime.modules import QuipLinearRef
            import torch

            ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
            if f8 is not None:
                f8(*targs, y)
                rec["tvm_int8_rel_err_vs_ref"] = float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())
                rec["tvm_int8_ms"] = statistics.median(i8_ms)
            f(*targs, y)
            rec["max_abs_err_vs_ref"] = float(np.abs(y.numpy() - ref).max())
            rec["tvm_ms"] = statistics.median(tvm_ms)
            rec["tvm_spread"] = [min(tvm_ms), max(tvm_ms)]
            if i8_ms:
                rec["tvm_fp32_over_int8"] = rec["tvm_ms"] / rec["tvm_int8_ms"]
            if cpp_ms:
                rec["cpp_ms"] = statistics.median(cpp_ms)
                rec["cpp_spread"] = [min(cpp_ms), max(cpp_ms)]
                rec["tvm_over_cpp"] = rec["tvm_ms"] / rec["cpp_ms"]
                rec["cpp_kernel"] = kernels.kernel_name()
            records.append(rec)
            print(json.dumps(rec))
    out = RESULTS / "tvm_kernel.json"
    out.write_text(json.dumps({"note": f"median of {args.reps} interleaved reps, each the mean of "
                                       f"{args.number} calls; TVM timed with time_evaluator, C++ via its "
                                       "numpy entry point (includes a little Python overhead)",
                               "records": records}, indent=1))
    print("wrote", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    b.add_argument("--artifact", default=None)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--baseline", action="store_true", default=True)
    b.set_defaults(fn=cmd_bench)
    t = sub.add_parser("table")
    t.set_defaults(fn=lambda a: table())
    p = sub.add_parser("ppl")
    p.add_argument("--bits", type=int, nargs="+", default=[2])
    p.add_argument("--artifact", default=None)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/quipc-tvm-builds")
    p.add_argument("--skip-torch", action="store_true")
    p.set_defaults(fn=cmd_ppl)
    k = sub.add_parser("kernel")
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--reps", type=int, default=7)
    k.add_argument("--number", type=int, default=50)
    k.add_argument("--kbits", type=int, nargs="+", default=[2])
    k.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                   default=[(4096, 4096)])
    k.set_defaults(fn=cmd_kernel)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
