"""Kernel benchmark (not a test): quipc `quip_linear` vs torch F.linear on the dense weight.

    python benchmarks/kernel_speed.py --json benchmarks/results/kernels.json      # CPU, 2 threads
    python benchmarks/kernel_speed.py --gpu --json OUT.json                       # CUDA (H100 ...)
    python benchmarks/kernel_speed.py --artifact DIR --fp32-model HF_DIR --json OUT.json  # decode
    python benchmarks/kernel_speed.py --formats grid e8p --shapes 7b --batches 1 --json OUT.json
    python benchmarks/kernel_speed.py --int8-activations ...   # the 4-bit GEMVs on int8 activations
    python benchmarks/kernel_speed.py --int8-activations --row-tiles-ab ...   # + the same plans without
                                                        # row tiles (AVX-512 VNNI), in the same rounds

Code formats (--formats, default grid, e8p and trellis): every format runs in the same
interleaved rounds as the grid kernel at the same bits and fp32, so each e8p / trellis record
also carries `vs_grid` (grid time / its time, > 1: faster than the grid).

Shapes are written IN x OUT (in_features x out_features), e.g. 576x1536 is an up-projection.
Every configuration is measured interleaved with its fp32 baseline (one repetition of each
method in turn, `--reps` times), and the median is reported. The machine may be shared:
compare ratios from one run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import quipc_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "runtime"))

import torch  # noqa: E402

from quipc_runtime import kernels as K  # noqa: E402
from quipc_runtime.layer import QuantizedLinear  # noqa: E402
from quipc_runtime.packing import packed_row_bytes  # noqa: E402
from quipc_runtime.transforms import Transform  # noqa: E402

SMOL = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # in x out
SEVEN_B = [(4096, 4096), (4096, 11008), (11008, 4096)]


def random_layer(n_in: int, n_out: int, bits: int, seed: int = 0) -> QuantizedLinear:
    """A layer with random codes (any byte pattern is a valid packing when n % 8 == 0)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n_out, packed_row_bytes(n_in, bits)), dtype=np.uint8)
    if n_in % 8:
        from quipc_runtime.packing import pack
        codes = pack(rng.integers(0, 1 << bits, (n_out, n_in)), bits)
    t_in = Transform.make("hadamard", n_in, seed + 1)
    t_in.signs = None
    return QuantizedLinear(f"bench{n_in}x{n_out}", n_out, n_in, bits, codes,
                           (rng.random(n_out) * 0.01).astype(np.float16),
                           (rng.standard_normal(n_out) * 0.01).astype(np.float16),
                           t_in, Transform.make("hadamard", n_out, seed + 2),
                           (rng.random(n_in) + 0.5).astype(np.float16), None)


def random_e8p_layer(n_in: int, n_out: int, bits: int, seed: int = 0) -> QuantizedLinear:
    """An e8p layer with random codes (every index is valid; n_in a multiple of 8)."""
    from quipc_runtime.formats.e8p import STAGES
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n_out, packed_row_bytes(n_in, bits)), dtype=np.uint8)
    t_in = Transform.make("hadamard", n_in, seed + 1)
    t_in.signs = None
    return QuantizedLinear(f"bench_e8p{n_in}x{n_out}", n_out, n_in, bits, codes,
                           (rng.random((n_out, len(STAGES[bits]))) * 0.01).astype(np.float16), None,
                           t_in, Transform.make("hadamard", n_out, seed + 2),
                           (rng.random(n_in) + 0.5).astype(np.float16), None, format="e8p")


def random_trellis_layer(n_in: int, n_out: int, bits: int, seed: int = 0) -> QuantizedLinear:
    """A trellis layer with random codes (any bitstream is a valid tail-biting path; both
    sides multiples of 16)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n_out, packed_row_bytes(n_in, bits)), dtype=np.uint8)
    t_in = Transform.make("hadamard", n_in, seed + 1)
    t_in.signs = None
    return QuantizedLinear(f"bench_trellis{n_in}x{n_out}", n_out, n_in, bits, codes,
                           (rng.random((n_out, 1)) * 0.01).astype(np.float16), None,
                           t_in, Transform.make("hadamard", n_out, seed + 2),
                           (rng.random(n_in) + 0.5).astype(np.float16), None, format="trellis")


# "trellis": the GEMV on the plan's 8-bit copy of the rows (trellis_as_int8, as a trellis lm_head
# runs); "trellis-exact": the exact GEMV, one gathered code value per weight (the blocks' default)
LAYER_MAKERS = {"grid": random_layer, "e8p": random_e8p_layer, "trellis": random_trellis_layer,
                "trellis-exact": random_trellis_layer}


def make_layer(fmt: str, n_in: int, n_out: int, bits: int) -> QuantizedLinear:
    return LAYER_MAKERS[fmt](n_in, n_out, bits)


def weight_bytes(layer: QuantizedLinear) -> int:
    """Bytes of weights a quip_linear call reads: codes + the fp16 scales (and zeros) per row."""
    extra = layer.scale.nbytes + (0 if layer.zero is None else layer.zero.nbytes)
    return layer.codes.nbytes + extra


def time_call(fn, min_time: float = 0.02) -> float:
    """Seconds per call: one call, or a loop of calls lasting at least min_time."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if dt >= min_time:
        return dt
    n = max(2, int(min_time / max(dt, 1e-7)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per call of each fn, measured round-robin `reps` times. Thread pools
    (torch's OpenMP, quipc's) spin for a while after a call, stealing a core from whatever
    runs next: a short pause precedes each measurement and the order rotates every round."""
    for fn in fns.values():
        fn()  # warm-up (page faults, thread pool start)
    samples = {k: [] for k in fns}
    keys = list(fns)
    for rep in range(reps):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            time.sleep(0.005)
            samples[k].append(time_call(fns[k]))
    return {k: statistics.median(v) for k, v in samples.items()}


def cpu_bench(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    shapes = (SMOL if "smol" in args.shapes else []) + (SEVEN_B if "7b" in args.shapes else [])
    formats = [f for f in args.formats if f == "grid"] + [f for f in args.formats if f != "grid"]
    records = []
    for n_in, n_out in shapes:
        w = torch.randn(n_out, n_in)
        configs = [(f, b) for b in args.bits for f in formats]  # (format, bits)
        layers = {c: make_layer(c[0], n_in, n_out, c[1]) for c in configs}
        plans = {c: K.prepare(layers[c], int8_activations=args.int8_activations,
                              trellis_as_int8=c[0] != "trellis-exact") for c in configs}
        rows = {c: K.prepare(layers[c], int8_activations=args.int8_activations, trellis_as_int8=c[0] != "trellis-exact",
                             row_tiles="off") for c in configs if args.row_tiles_ab and plans[c].gemv_on_row_tiles}
        key = {c: f"q{c[1]}" if c[0] == "grid" else f"{c[0]}{c[1]}" for c in configs}
        for batch in args.batches:
            x = torch.randn(batch, n_in)
            xn = x.numpy()
            out = {c: np.empty((batch, n_out), np.float32) for c in configs}
            fns = {"fp32": lambda: torch.nn.functional.linear(x, w)}
            staged = {}
            for c in configs:
                fns[key[c]] = (lambda p=plans[c], o=out[c]: p.forward(xn, out=o, threads=args.threads))
                if c in rows and batch <= 4:
                    fns[key[c] + "_rows"] = (lambda p=rows[c], o=out[c]: p.forward(xn, out=o, threads=args.threads))
                if batch == 1:  # bare quantized matmul, for the transform overhead
                    z, zs = plans[c].transform_in(xn, threads=args.threads)
                    staged[c] = (z, zs)
                    fns["mm" + key[c]] = (lambda p=plans[c], s=staged[c]: p.matmul(s[0], s[1], threads=args.threads))
            reps = args.reps if batch == 1 or n_in * n_out < 5e6 else max(3, args.reps // 2)
            med = interleaved(fns, reps)
            for c in configs:
                fmt, b = c
                q = med[key[c]]
                rec = {"kind": "layer", "device": "cpu", "shape": f"{n_in}x{n_out}", "in": n_in,
                       "out": n_out, "bits": b, "format": fmt, "batch": batch, "threads": args.threads,
                       "kernels": K.kernel_name(), "int8_activations": args.int8_activations,
                       "gemv_int8": bool(plans[c].gemv_int8) and batch <= 4,
                       "row_tiles": bool(plans[c].gemv_on_row_tiles) and batch <= 4, "quipc_ms": q * 1e3,
                       "fp32_ms": med["fp32"] * 1e3, "speedup": med["fp32"] / q,
                       "quipc_weight_GBps": weight_bytes(layers[c]) / q / 1e9,
                       "fp32_weight_GBps": 4 * n_in * n_out / med["fp32"] / 1e9}
                if fmt != "grid" and ("grid", b) in key:
                    rec["grid_ms"] = med[key[("grid", b)]] * 1e3
                    rec["vs_grid"] = med[key[("grid", b)]] / q
                if key[c] + "_rows" in med:   # the same plan without row tiles (--row-tiles-ab)
                    rec["rows_ms"] = med[key[c] + "_rows"] * 1e3
                    rec["vs_rows"] = med[key[c] + "_rows"] / q
                if "mm" + key[c] in med:
                    rec["matmul_only_ms"] = med["mm" + key[c]] * 1e3
                    rec["transform_overhead"] = q / med["mm" + key[c]] - 1
                records.append(rec)
                print(f"{rec['shape']:>11} {fmt:>4} b{b} B={batch:<3} quipc {rec['quipc_ms']:8.3f} ms  fp32 "
                      f"{rec['fp32_ms']:8.3f} ms  x{rec['speedup']:.2f}  "
                      f"({rec['quipc_weight_GBps']:.1f} vs {rec['fp32_weight_GBps']:.1f} GB/s)"
                      + (f"  vs grid x{rec['vs_grid']:.2f}" if "vs_grid" in rec else "")
                      + (f"  vs rows x{rec['vs_rows']:.2f}" if "vs_rows" in rec else "")
                      + (f"  transforms +{100 * rec['transform_overhead']:.0f}%" if "transform_overhead" in rec else ""),
                      flush=True)
    return records


def cuda_event_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / iters


def gpu_bench(args) -> list[dict]:
    if not K.cuda_available():
        print("GPU benchmark skipped: no CUDA build of the kernels or no GPU", file=sys.stderr)
        return [{"kind": "gpu", "skipped": "no CUDA build or no GPU"}]
    torch_cuda = torch.cuda.is_available()
    name = K._ext.cuda_device_name(0)
    records = []
    shapes = ([(8192, 8192)] if "7b" in args.shapes else []) \
        + (SMOL if "smol" in args.shapes else []) + (SEVEN_B if "7b" in args.shapes else [])
    for n_in, n_out in shapes:
        for batch in (1, 16):
            base = {}
            if torch_cuda:
                for dt, key in ((torch.float16, "fp16_ms"), (torch.float32, "fp32_ms")):
                    w = torch.randn(n_out, n_in, device="cuda", dtype=dt)
                    x = torch.randn(batch, n_in, device="cuda", dtype=dt)
                    base[key] = statistics.median(
                        cuda_event_ms(lambda: torch.nn.functional.linear(x, w), 200) for _ in range(3))
                    del w, x
            for fmt, b in [(f, b) for b in args.bits for f in args.formats]:
                plan = K.prepare_cuda(make_layer(fmt, n_in, n_out, b))
                rec = {"kind": "layer", "device": name, "shape": f"{n_in}x{n_out}", "in": n_in,
                       "out": n_out, "bits": b, "format": fmt, "batch": batch,
                       "gemv_ms" if batch <= 4 else "qmatmul_ms":
                           statistics.median(plan.benchmark("matmul", batch, 200) for _ in range(3)),
                       "quipc_ms": statistics.median(plan.benchmark("forward", batch, 200) for _ in range(3))}
                if batch == 1:   # the transforms one kernel per factor, as before the chain kernel
                    os.environ["QUIPC_CUDA_CHAIN"] = "0"
                    rec["quipc_per_factor_ms"] = statistics.median(plan.benchmark("forward", batch, 200)
                                                                   for _ in range(3))
                    del os.environ["QUIPC_CUDA_CHAIN"]
                os.environ["QUIPC_CUDA_GEMV"] = "simple"
                if batch <= 4:
                    rec["gemv_simple_ms"] = plan.benchmark("matmul", batch, 100)
                del os.environ["QUIPC_CUDA_GEMV"]
                if fmt.startswith("trellis") and 4 < batch <= 16:   # 4-row GEMVs instead of the tile
                    os.environ.update(QUIPC_CUDA_TRELLIS_CHUNKS="1", QUIPC_CUDA_TRELLIS_ROWS="auto")
                    rec["qmatmul_chunks_ms"] = statistics.median(plan.benchmark("matmul", batch, 200)
                                                                 for _ in range(3))
                    del os.environ["QUIPC_CUDA_TRELLIS_CHUNKS"], os.environ["QUIPC_CUDA_TRELLIS_ROWS"]
                if fmt.startswith("trellis") and batch <= 4:   # the word-load GEMV (opt-in), rows per warp
                    for rows in ("1", "2", "4", "auto"):
                        os.environ["QUIPC_CUDA_TRELLIS_ROWS"] = rows
                        rec[f"gemv_rows{rows}_ms"] = statistics.median(plan.benchmark("matmul", batch, 200)
                                                                       for _ in range(3))
                    del os.environ["QUIPC_CUDA_TRELLIS_ROWS"]
                mm = rec.get("gemv_ms", rec.get("qmatmul_ms"))
                rec["matmul_weight_GBps"] = (n_in * n_out * b / 8 + 4 * n_out) / (mm * 1e-3) / 1e9
                if fmt not in ("grid", "trellis", "trellis-exact"):  # the formats with a first GEMV kept
                    rec.pop("gemv_simple_ms", None)
                rec.update(base)
                if "fp16_ms" in base:
                    rec["speedup_matmul_vs_fp16"] = base["fp16_ms"] / mm
                    rec["speedup_vs_fp16"] = base["fp16_ms"] / rec["quipc_ms"]
                records.append(rec)
                print(json.dumps(rec), flush=True)
                del plan
    return records


def load_fp32(spec: str):
    """The fp32 baseline: through quipc.frontend (aliases, .gguf) when present, else transformers."""
    try:
        if str(ROOT) not in sys.path:
            sys.path.append(str(ROOT))  # the compiler package, when not installed
        from quipc.frontend.hf import load_model
        from quipc.frontend.models import resolve
        model, tok = load_model(resolve(spec))
    except ImportError:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(spec)
    return model, tok


def decode_bench(args) -> list[dict]:
    """Greedy decode tokens/s (KV cache on): quipc kernels model vs the fp32 model."""
    if not args.fp32_model:
        return [{"kind": "decode", "skipped": "--fp32-model not given"}]
    torch.set_num_threads(args.threads)
    try:
        model_q = quipc_runtime.load(args.artifact, backend="kernels")
        model_f, tok = load_fp32(args.fp32_model)
    except Exception as exc:  # loader / frontend missing, or a bad artifact
        print(f"decode benchmark skipped: {exc}", file=sys.stderr)
        return [{"kind": "decode", "skipped": str(exc)}]
    for model in (model_q, model_f):
        model.config.use_cache = True
        model.generation_config.use_cache = True
    ids = tok("The quick brown fox jumps over the lazy dog. Once upon a time",
              return_tensors="pt").input_ids

    def gen(model):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                           do_sample=False)

    med = interleaved({"q": lambda: gen(model_q), "f": lambda: gen(model_f)}, max(3, args.reps // 2))
    manifest = getattr(model_q, "quipc_manifest", {}) or {}
    layer_bits = {l.get("bits") for b in manifest.get("blocks", []) for l in b.get("layers", [])}
    bits = layer_bits.pop() if len(layer_bits) == 1 else sorted(layer_bits, key=str)
    rec = {"kind": "decode", "model": str(args.artifact), "fp32_model": args.fp32_model,
           "bits": bits, "threads": args.threads, "tokens": args.tokens,
           "tok_s": args.tokens / med["q"], "fp32_tok_s": args.tokens / med["f"]}
    rec["speedup"] = rec["tok_s"] / rec["fp32_tok_s"]
    print(json.dumps(rec))
    return [rec]


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = [r for r in records if r.get("kind") == "layer" and "speedup" in r]
    if not layer:
        return
    groups = sorted({(r["batch"], r["in"] * r["out"], r["shape"]) for r in layer})
    series = sorted({(r.get("format", "grid"), r["bits"]) for r in layer})
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.3 * len(series)), 4.5))
    width = 0.8 / len(series)
    for i, (fmt, b) in enumerate(series):
        vals = [next((r["speedup"] for r in layer if r["bits"] == b and r.get("format", "grid") == fmt
                      and r["batch"] == g[0] and r["shape"] == g[2]), 0) for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, vals, width,
               label=f"{b}-bit" if fmt == "grid" else f"{fmt} {b}-bit")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(groups)) + width * (len(series) - 1) / 2)
    ax.set_xticklabels([f"{g[2]}\nB={g[0]}" for g in groups], fontsize=8)
    ax.set_ylabel("speedup vs fp32 F.linear")
    ax.set_title(f"quipc quip_linear (transforms included), {layer[0]['threads']} threads, in x out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path, help="bar chart (default: JSON path with .png)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--shapes", nargs="+", default=["smol", "7b"], choices=["smol", "7b"])
    ap.add_argument("--formats", nargs="+", default=["grid", "e8p", "trellis"], choices=sorted(LAYER_MAKERS),
                    help="code formats to measure; on the CPU grid is measured first")
    ap.add_argument("--gpu", action="store_true", help="CUDA kernels instead of the CPU ones")
    ap.add_argument("--int8-activations", action="store_true",
                    help="CPU plans whose 4-bit GEMVs (4-bit grid, e8p as nibbles) take int8 activations")
    ap.add_argument("--row-tiles-ab", action="store_true",
                    help="with --int8-activations: also time each plan that reads row tiles (AVX-512 VNNI) "
                         "without them, in the same rounds (records rows_ms, vs_rows)")
    ap.add_argument("--artifact", type=Path, help="also measure decode tok/s of this artifact")
    ap.add_argument("--fp32-model", help="fp32 baseline for --artifact: alias (smollm2-135m), HF dir or .gguf")
    ap.add_argument("--decode-only", action="store_true", help="with --artifact: skip the layer benchmark")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    if not K.available():
        sys.exit("quipc kernels are not built: pip install --no-build-isolation .")
    if args.decode_only and args.artifact:
        records = []
    else:
        records = gpu_bench(args) if args.gpu else cpu_bench(args)
    if args.artifact:
        records += decode_bench(args)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "convention": "shape is in_features x out_features",
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    if not args.gpu:
        plot(records, args.png or args.json.with_suffix(".png"))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
