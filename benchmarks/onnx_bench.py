"""benchmarks/onnx: SmolLM2-135M in ONNX, fp32 vs onnxruntime's weight-only quantizers vs quipc.

    python benchmarks/onnx_bench.py --windows 16 --json benchmarks/results/onnx.json

One run, one machine, onnxruntime CPU with --threads (default 2) intra-op threads:
- fp32: the model exported by quipc.backends.onnx.export_hf_model (one graph, KV cache).
- onnxruntime.quantization.matmul_nbits_quantizer on that fp32 ONNX: DEFAULT ("RTN", its own
  blockwise round-to-nearest) and GPTQ 4-bit at block 32 and 128, HQQ 4-bit block 128;
  MatMulNBits accuracy_level=4 (int8 activations: its fastest CPU path). Its quantizer leaves the
  tied lm_head (a MatMul on the embedding's Transpose) fp32; rows ort_rtn_b{32,128}_qhead untie it
  into its own initializer first, so that it is quantized too (quipc's defaults quantize theirs).
- quipc from the ONNX input (quipc.frontend.onnx_model.compile_onnx) at 4, 3, 2 bits,
  calibrated per PROTOCOL (first 64 windows of 512 tokens of wiki.valid.tokens).
- optionally (--artifacts) quipc artifacts compiled by the torch path, exported with
  lower_artifact (--graph auto: the traced graph), with the artifact's own torch-path perplexity beside them (--torch-ppl);
  --agreement adds their accuracy_level-1 exports (fp32 activations, the torch path's math).
- every quipc model twice: through its ONNX function bodies (stock onnxruntime, the plain
  rows) and with quipc's custom-op library registered (rows `..._lib`: one fused C++ kernel per
  QuipLinear / QuipLinearGroup node; its decode GEMVs on int8 activations at accuracy_level 0 and 4,
  fp32 ones at 1-3; the exports here take --onnx-accuracy-level, default auto as `quipc compile`'s);
  --no-custom-ops leaves the `_lib` rows out. --op-profile adds a per-op comparison from
  onnxruntime's profiler (benchmarks/onnx_op_profile.py).
Perplexity per PROTOCOL (wiki.test.raw, 2048-token windows, the first --windows).
Latency: prefill of 512 tokens, and decode per token with the KV cache (batch 1) after a
128-token prompt; all models are timed interleaved, --reps rounds, median; ratios are to
fp32 measured in the same rounds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "runtime"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from quipc.backends.onnx.emitter import accuracy_level_label  # noqa: E402
from quipc.frontend.onnx_targets import find_targets  # noqa: E402
from quipc.cli import _accuracy_level  # noqa: E402

DATA = Path("/work/shared/data/wikitext-2")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def untie_head(model) -> int:
    """The tied lm_head, MatMul(x, Transpose(embed_tokens)), as a MatMul on its own transposed copy,
    so that onnxruntime's quantizer (which takes only initializer weights) quantizes it too; the
    embedding's Gather keeps the fp32 table. Returns how many MatMuls it untied. The head is found
    as quipc's .onnx frontend finds it (onnx_targets.find_targets: a weight read from an embedding)."""
    from onnx import numpy_helper

    from quipc.frontend.onnx_calibration import embedding_tables
    from quipc.frontend.onnx_rewrite import _prune

    tables = set(embedding_tables(model))
    targets, _ = find_targets(model, quantize_lm_head=True)
    heads = [t for t in targets if any(d in tables for d in t.weight_names)]
    for t in heads:   # t.weight is (out, in); MatMul's B is (in, out)
        name = t.weight_names[0] + ".lm_head_t"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(t.weight.T), name))
        t.node.input[1] = name
    live = _prune(list(model.graph.node), {o.name for o in model.graph.output})   # the dead Transpose
    del model.graph.node[:]
    model.graph.node.extend(live)
    return len(heads)


def ort_quantize(fp32: Path, out: Path, algo: str, block: int, calib_windows, threads: int,
                 quantize_head: bool = False) -> Path:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    path = out / "model.onnx"
    if path.is_file():
        return path
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(fp32))
    if quantize_head and untie_head(model) != 1:
        raise RuntimeError("expected one tied lm_head MatMul(x, Transpose(table)) in the fp32 file")
    if algo == "rtn":
        # ORT's native blockwise RTN; its asymmetric block-128 path crashes for K=576
        cfg = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=(block == 128), accuracy_level=4)
        q = mq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=(block == 128), accuracy_level=4,
                                    algo_config=cfg)
    elif algo == "hqq":
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
        q = mq.MatMulNBitsQuantizer(model, block_size=block, accuracy_level=4, algo_config=cfg)
    elif algo == "gptq":
        reader = _Reader(calib_windows, model)
        cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)
        q = mq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False, accuracy_level=4,
                                    algo_config=cfg)
    else:
        raise ValueError(algo)
    q.process()
    q.model.save_model_to_file(str(path), use_external_data_format=True)
    return path


class _Reader:
    """onnxruntime CalibrationDataReader over calibration windows (empty KV cache)."""

    def __init__(self, windows, model):
        self.windows = windows
        self.past = []
        for inp in model.graph.input:
            if inp.name != "input_ids":
                dims = [d.dim_value if d.dim_value > 0 else 0 for d in inp.type.tensor_type.shape.dim]
                dims[0] = 1
                self.past.append((inp.name, dims))
        self.i = 0

    def get_next(self):
        if self.i >= len(self.windows):
            return None
        ids = self.windows[self.i][None].numpy().astype(np.int64)
        self.i += 1
        return {"input_ids": ids, **{n: np.zeros(d, np.float32) for n, d in self.past}}

    def __iter__(self):
        self.i = 0
        while (item := self.get_next()) is not None:
            yield item

    def rewind(self):
        self.i = 0


def nbits_bpw(path: Path) -> float:
    """PROTOCOL bpw of MatMulNBits layers: B + scales + zero points over N*K weights."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    bits = weights = 0
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in n.attribute}
        weights += a["K"] * a["N"]
        for name in n.input[1:]:
            if name in inits:
                bits += 8 * numpy_helper.to_array(inits[name]).nbytes
    return bits / max(weights, 1)


def _export_level(folder: Path):
    """The accuracy_level an export in `folder` was written at (its metadata), None if unknown."""
    meta = folder / "quipc_onnx.json"
    return json.loads(meta.read_text()).get("accuracy_level") if meta.is_file() else None


def measure_latency(models: dict, reps: int, prompt: int = 128, decode_tokens: int = 16) -> dict:
    ids512 = np.arange(1000, 1512, dtype=np.int64)[None]
    times = {k: {"prefill": [], "decode": []} for k in models}
    for r in range(reps):
        for name, lm in models.items():
            t = time.perf_counter()
            lm.logits(ids512)
            times[name]["prefill"].append(time.perf_counter() - t)
            last, past = lm.prefill(ids512[:, :prompt])
            steps = []
            for i in range(decode_tokens):
                t = time.perf_counter()
                last, past = lm.decode(int(np.argmax(last)), past, prompt + i)
                steps.append(time.perf_counter() - t)
            times[name]["decode"].append(float(np.median(steps)))
        log(f"latency round {r + 1}/{reps} done")
    return {k: {"prefill_ms": 1000 * float(np.median(v["prefill"])), "decode_ms": 1000 * float(np.median(v["decode"]))}
            for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16, help="eval windows of 2048 tokens (PROTOCOL quick: 16)")
    ap.add_argument("--json", required=True, help="where to write the records")
    ap.add_argument("--work", default="/tmp/quipc_onnx_bench", help="folder for the ONNX models (kept, reused)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 3, 2])
    ap.add_argument("--gptq-windows", type=int, default=8,
                    help="calibration windows (512 tokens) for onnxruntime's GPTQ (it runs the model once per "
                         "distinct MatMul input, so PROTOCOL's 64 would take hours)")
    ap.add_argument("--no-gptq", action="store_true",
                    help="skip onnxruntime's GPTQ (one full forward per distinct MatMul input and window)")
    ap.add_argument("--only", nargs="*", help="restrict to these record names")
    ap.add_argument("--artifacts", default=None,
                    help="pattern of torch-path artifacts to export too, e.g. /work/artifacts/smollm2-quip-w{bits}")
    ap.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                    help="one more torch-path artifact to export, as row quipc_art_NAME (repeatable: several "
                         "artifacts of one width, e.g. two settings, timed in the same rounds)")
    ap.add_argument("--onnx-accuracy-level", type=_accuracy_level, default=None, metavar="auto|0|1|2|3|4",
                    help="the quipc exports' accuracy_level, as `quipc compile --onnx-accuracy-level` (default "
                         "auto, what a user's export gets; an export in --work at another level is redone)")
    ap.add_argument("--rescale", action="store_true",
                    help="QuIP's diagonal rescaling (off by default, as in the reference artifacts "
                         "/work/artifacts/smollm2-quip-w*: quip, hadamard, seed 0, damp 0.01, grid mse)")
    ap.add_argument("--torch-ppl", action="store_true",
                    help="also evaluate the quipc models on the torch path: --artifacts artifacts with "
                         "quipc_runtime.load, quipc_onnx_w* with their layers read back from the ONNX file")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-custom-ops", action="store_true",
                    help="leave out the quipc rows run with the custom-op library (`..._lib`)")
    ap.add_argument("--op-profile", action="store_true",
                    help="also profile single ops at batch 1 (QuipLinear with the library vs MatMulNBits "
                         "4-bit block 32, QuipLinearGroup vs its parts) and write them to the JSON")
    ap.add_argument("--agreement", action="store_true",
                    help="with --artifacts: also export them at accuracy_level 1 (fp32 activations) and compare "
                         "their perplexity with the torch path (use with --torch-ppl)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from quipc.backends.lower import lower_artifact
    from quipc.backends.onnx import export_hf_model
    from quipc.compile import CalibConfig
    from quipc.config import QuantConfig
    from quipc.eval.perplexity import eval_windows, perplexity
    from quipc.frontend.calibration import text_windows
    from quipc.frontend.hf import load_model
    from quipc.frontend.models import resolve
    from quipc.frontend.onnx_model import compile_onnx
    from quipc_runtime.onnx_runtime import OnnxLM

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "records.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def save_state():
        state_path.write_text(json.dumps(state, indent=1))

    fp32_dir = work / "fp32"
    tok = None
    if not (fp32_dir / "model.onnx").is_file():
        log("export fp32 SmolLM2-135M to ONNX")
        model, tok = load_model(resolve("smollm2-135m"))
        export_hf_model(model, fp32_dir, tokenizer=tok)
        del model
    if tok is None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(fp32_dir / "tokenizer")
    fp32 = fp32_dir / "model.onnx"
    windows = eval_windows(tok, DATA / "wiki.test.raw", 2048, args.windows)
    calib_text = DATA / "wiki.valid.tokens"

    specs = [dict(name="fp32", source="onnx export (quipc export_hf_model)", algo="fp32", bits=32, block_size=None,
                  path=fp32, bpw=32.0)]
    ort_algos = [("rtn", 32), ("rtn", 128), ("hqq", 128)]
    if not args.no_gptq:
        ort_algos += [("gptq", 32), ("gptq", 128)]
    for algo, block in ort_algos:
        specs.append(dict(name=f"ort_{algo}_b{block}", source="onnxruntime matmul_nbits_quantizer",
                          algo={"rtn": "RTN (DEFAULT)", "gptq": "GPTQ", "hqq": "HQQ"}[algo] +
                          (" sym" if (algo == "rtn" and block == 128) else ""),
                          bits=4, block_size=block, ort=(algo, block)))
    for block in (32, 128):   # the lm_head quantized too: the like-for-like pair of quipc's quantized heads
        specs.append(dict(name=f"ort_rtn_b{block}_qhead", source="onnxruntime matmul_nbits_quantizer, "
                          "lm_head untied from the embedding and quantized", algo="RTN (DEFAULT)" +
                          (" sym" if block == 128 else ""), bits=4, block_size=block, ort=("rtn", block),
                          quantize_head=True))
    for b in args.bits:
        specs.append(dict(name=f"quipc_onnx_w{b}", source="quipc ONNX frontend (compile model.onnx)", algo="QuIP",
                          bits=b, block_size=None, quipc=b))
    if args.artifacts:
        for b in args.bits:
            art = Path(args.artifacts.format(bits=b))
            specs.append(dict(name=f"quipc_art_w{b}", source=f"quipc artifact export ({art})", algo="QuIP",
                              bits=b, block_size=None, artifact=art))
            if args.agreement:  # fp32 activations: the exact torch-path math, for the agreement check
                specs.append(dict(name=f"quipc_art_w{b}_acc1", source=f"quipc artifact export ({art}), "
                                  "accuracy_level 1", algo="QuIP", bits=b, block_size=None, artifact=art,
                                  accuracy_level=1))
    for item in args.artifact:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--artifact takes NAME=PATH, not {item!r}")
        art = Path(path)
        bits = json.loads((art / "manifest.json").read_text())["quant_config"]["bits"]
        specs.append(dict(name=f"quipc_art_{label}", source=f"quipc artifact export ({art})", algo="QuIP",
                          bits=bits, block_size=None, artifact=art))
    if not args.no_custom_ops:   # the same files with quipc's kernels (cpp/ort) in onnxruntime
        specs += [dict(s, name=s["name"] + "_lib", lib_of=s["name"], custom_ops=True,
                       source=s["source"] + " + quipc custom-op library")
                  for s in list(specs) if "quipc" in s or "artifact" in s]
    if args.only:   # a `_lib` row needs its plain row's file
        keep = set(args.only) | {s["lib_of"] for s in specs if s["name"] in args.only and "lib_of" in s}
        specs = [s for s in specs if s["name"] in keep or s["name"] == "fp32"]
    by_name = {s["name"]: s for s in specs}

    # --- build the models -----------------------------------------------------------------
    for s in specs:
        rec = state.setdefault(s["name"], {})
        try:
            if "lib_of" in s:     # the file of its plain row
                src = by_name.get(s["lib_of"]) or {}
                s["path"] = src.get("path")
                rec["bpw"] = state.get(s["lib_of"], {}).get("bpw")
            elif "ort" in s:
                algo, block = s["ort"]
                t = time.time()
                gw = text_windows(tok, calib_text, args.gptq_windows, 512) if algo == "gptq" else None
                if not (work / s["name"] / "model.onnx").is_file():
                    log(f"onnxruntime quantizer {s['name']}")
                s["path"] = ort_quantize(fp32, work / s["name"], algo, block, gw, args.threads,
                                         quantize_head=s.get("quantize_head", False))
                rec.setdefault("build_s", time.time() - t)
                if algo == "gptq":
                    rec["calibration"] = f"{args.gptq_windows} windows x 512 of wiki.valid.tokens"
                rec.setdefault("bpw", nbits_bpw(s["path"]))
            elif "quipc" in s:
                out = work / s["name"]
                if not (out / "model.onnx").is_file():
                    log(f"quipc compile from ONNX, {s['quipc']} bits")
                    summary = compile_onnx(fp32, out, QuantConfig(bits=s["quipc"], rescale=args.rescale),
                                           CalibConfig(text=str(calib_text), windows=64, length=512),
                                           tokenizer=str(fp32_dir / "tokenizer"), progress=True,
                                           threads=args.threads, hessian_cache=work / "hessians.pt")
                    rec.update(bpw=summary["bpw"], build_s=summary["seconds"],
                               calibration=summary["calibration_mode"])
                s["path"] = out / "model.onnx"
            elif "artifact" in s:
                out = work / s["name"]
                level = s.get("accuracy_level", args.onnx_accuracy_level)
                if not (out / "model.onnx").is_file() or _export_level(out) != accuracy_level_label(level):
                    log(f"export artifact {s['artifact']} (accuracy_level {accuracy_level_label(level)})")
                    lower_artifact(s["artifact"], out, target="onnx", progress=False, accuracy_level=level)
                meta = json.loads((out / "quipc_onnx.json").read_text())
                rec["bpw"] = meta["bpw"]
                s["path"] = out / "model.onnx"
            else:
                rec["bpw"] = s["bpw"]
            save_state()
        except Exception as e:  # one failing quantizer must not sink the whole run
            traceback.print_exc()
            rec["error"] = f"{type(e).__name__}: {e}"
            s["path"] = None
            save_state()

    # --- perplexity -------------------------------------------------------------------------
    hf_model = None
    torch_ppl_of: dict = {}  # artifact path -> (torch-path result, what was measured)
    for s in specs:
        rec = state[s["name"]]
        if s.get("path") is None:
            continue
        if rec.get("ppl_windows") != args.windows:
            log(f"perplexity {s['name']}")
            lm = OnnxLM(s["path"], threads=args.threads, providers=["CPUExecutionProvider"],
                        custom_ops=s.get("custom_ops", False))
            res = perplexity(lm.logits, windows, progress=False)
            rec.update(ppl=res["ppl"], ppl_windows=args.windows, eval_s=res["seconds"])
            log(f"  ppl {rec['ppl']:.3f}")
            save_state()
            del lm
        if args.torch_ppl and ("artifact" in s or "quipc" in s) and "lib_of" not in s and rec.get("torch_ppl_windows") != args.windows:
            # the same quantized layers on the torch reference path (QuipLinearRef)
            from quipc.eval.perplexity import torch_logits_fn
            from quipc_runtime import load

            if "artifact" in s and str(s["artifact"]) in torch_ppl_of:  # the same artifact, measured already
                res_t, what = torch_ppl_of[str(s["artifact"])]
                rec.update(torch_ppl=res_t["ppl"], torch_ppl_windows=args.windows, torch_ppl_of=what,
                           onnx_vs_torch=rec["ppl"] / res_t["ppl"] - 1)
                save_state()
                continue
            if "artifact" in s:
                tmodel, what = load(s["artifact"]), "artifact torch path (quipc_runtime.load)"
            else:
                from quipc.backends.onnx.inspect import layers_from_onnx, torch_model_with

                if hf_model is None:
                    hf_model = load_model(resolve("smollm2-135m"))[0]
                import copy
                tmodel = torch_model_with(copy.deepcopy(hf_model), layers_from_onnx(s["path"]))
                what = "layers read back from the ONNX model on QuipLinearRef"
            log(f"torch perplexity {s['name']}")
            res_t = perplexity(torch_logits_fn(tmodel), windows, progress=False)
            if "artifact" in s:
                torch_ppl_of[str(s["artifact"])] = (res_t, what)
            rec.update(torch_ppl=res_t["ppl"], torch_ppl_windows=args.windows, torch_ppl_of=what,
                       onnx_vs_torch=rec["ppl"] / res_t["ppl"] - 1)
            log(f"  torch ppl {res_t['ppl']:.3f} (onnx/torch - 1 = {rec['onnx_vs_torch']:+.4%})")
            save_state()
            del tmodel

    # --- latency (all sessions loaded, interleaved) -------------------------------------------
    if args.no_latency:
        live = {}
    else:
        live = {s["name"]: OnnxLM(s["path"], threads=args.threads, providers=["CPUExecutionProvider"],
                                  custom_ops=s.get("custom_ops", False))
                for s in specs if s.get("path") is not None and s.get("latency", True)}
    log(f"latency: {len(live)} models, {args.reps} rounds, {args.threads} threads")
    lat = measure_latency(live, args.reps) if live else {}
    del live
    base = lat.get("fp32")
    records = []
    for s in specs:
        rec = state[s["name"]]
        r = {"name": s["name"], "source": s["source"], "algo": s["algo"], "bits": s["bits"],
             "block_size": s["block_size"], "bpw": rec.get("bpw"), "ppl": rec.get("ppl"),
             "prefill_ms": lat.get(s["name"], {}).get("prefill_ms"),
             "decode_ms": lat.get(s["name"], {}).get("decode_ms"), "custom_ops": s.get("custom_ops", False)}
        if base and r["prefill_ms"] is not None:
            r["prefill_ratio"] = r["prefill_ms"] / base["prefill_ms"]
            r["decode_ratio"] = r["decode_ms"] / base["decode_ms"]
        for k in ("torch_ppl", "torch_ppl_of", "onnx_vs_torch", "calibration", "error", "build_s"):
            if k in rec:
                r[k] = rec[k]
        records.append(r)
    out = {"benchmark": "onnx", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
           "eval": {"text": "wiki.test.raw", "ctx": 2048, "windows": args.windows},
           "threads": args.threads, "latency": {"reps": args.reps, "prefill_tokens": 512,
                                                 "decode": "median per token, 16 tokens after a 128-token prompt"},
           "onnxruntime": __import__("onnxruntime").__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "records": records}
    if args.op_profile:
        from onnx_op_profile import profile_ops

        log("per-op profile (batch 1)")
        out["op_profile"] = profile_ops(work / "op_profile", args.threads)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    for row in out.get("op_profile", []):
        print(row)
    print(f"\n{'name':22s} {'bits':>4s} {'bpw':>6s} {'ppl':>8s} {'prefill':>9s} {'ratio':>6s} {'decode':>8s} {'ratio':>6s}")
    for r in records:
        fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "-"  # noqa: E731
        print(f"{r['name']:22s} {r['bits']:>4d} {fmt(r['bpw'], '%.3f'):>6s} {fmt(r['ppl'], '%.3f'):>8s} "
              f"{fmt(r['prefill_ms'], '%.1f'):>9s} {fmt(r.get('prefill_ratio'), '%.2f'):>6s} "
              f"{fmt(r['decode_ms'], '%.2f'):>8s} {fmt(r.get('decode_ratio'), '%.2f'):>6s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
