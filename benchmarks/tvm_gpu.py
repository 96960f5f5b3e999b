"""TVM's CUDA builds, prepared here and run on a GPU machine (not tests: they take minutes).

    python benchmarks/tvm_gpu.py prepare DIR [--target cuda:sm_90] [--tiny ART] [--model ART]
        # here (nvcc): CUDA builds of a tiny model, a SmolLM2-shaped one and the 4096x4096 kernel
    python benchmarks/tvm_gpu.py check DIR [--out F.json]
        # there (the TVM runtime only): the builds against their expected outputs, timings -> JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "runtime", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from backends import random_layer  # noqa: E402  (benchmarks/ is the script's folder)


def cmd_gpu_prepare(args) -> None:
    """Build here (nvcc): tiny model + a SmolLM2-shaped model for cuda, and the 4096x4096 kernel."""
    import shutil

    import numpy as np
    import tvm

    from quipc.backends.tvm import compile_artifact
    from quipc.backends.tvm import tir_quip_linear as Q
    from quipc.backends.tvm.lowering import linear_prim_func
    from quipc.backends.tvm.build import resolve_target, schedule

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    tgt = resolve_target(args.target)
    if args.tiny:  # tiny artifact + its cuda build: whole-model correctness there
        shutil.copytree(args.tiny, out / "tiny_art", dirs_exist_ok=True)
        if not (out / "tiny_cuda" / "tvm_config.json").exists():
            compile_artifact(Path(args.tiny), out / "tiny_cuda", target=args.target, progress=False)
    if args.model:  # SmolLM2-shaped: library only; parameters are regenerated there (random, same shapes)
        tmp = out / "model_tmp"
        if not (tmp / "tvm_config.json").exists():
            compile_artifact(Path(args.model), tmp, target=args.target, progress=False)
        (out / "model_cuda").mkdir(exist_ok=True)
        for name in ("model.so", "tvm_config.json"):
            shutil.copy(tmp / name, out / "model_cuda" / name)
        loaded = tvm.runtime.load_param_dict_from_file(str(tmp / "params.bin"))
        cfg = json.loads((tmp / "tvm_config.json").read_text())
        shapes = {k: [list(loaded[k].shape), str(loaded[k].dtype)] for k in cfg["params"]}
        (out / "model_cuda" / "param_shapes.json").write_text(json.dumps(shapes))
    # the kernel alone: 4096x4096 2-bit, batch 1
    layer = random_layer(4096, 4096, 2)
    spec = Q.LinearSpec.of(layer)
    mod = tvm.IRModule({"main": linear_prim_func(spec, "gemv").with_attr("global_symbol", "main")})
    lib = tvm.compile(schedule(mod, tgt), target=tgt)
    lib.export_library(str(out / "kernel_4096_b2.so"))
    x = np.random.default_rng(1).normal(size=(1, 4096)).astype(np.float32)
    p = Q.linear_params(layer, spec)
    import torch

    from quipc_runtime.modules import QuipLinearRef

    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    np.savez(out / "kernel_4096_b2.npz", x=x, ref=ref, codes=layer.codes, scale=layer.scale, zero=layer.zero,
             **{f"arg{i}": p[k] for i, k in enumerate(Q.param_names(spec))})
    print("prepared", out)


def cmd_gpu_check(args) -> None:
    """Runs on the GPU machine with the TVM runtime only (TVM_USE_RUNTIME_LIB=1)."""
    import statistics

    import numpy as np
    import tvm

    from quipc_runtime.tvm_runtime import TvmLM, ensure_cuda_runtime

    ensure_cuda_runtime()
    d = Path(args.dir)
    res = {"device": None}
    dev = tvm.cuda(0)
    res["device"] = str(dev) + " exists=" + str(dev.exist)
    # 1. tiny model: logits and greedy generation vs the torch reference path (CPU)
    if (d / "tiny_cuda").exists():
        try:
            import torch

            import quipc_runtime

            model = quipc_runtime.load(d / "tiny_art")
            lm = TvmLM(d / "tiny_cuda")
            ids = torch.randint(3, 17, (1, 37), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = model(input_ids=ids, use_cache=False).logits[0].numpy()
            got = lm.logits(ids[0].numpy())
            with torch.no_grad():
                want = model.generate(ids[:, :9], max_new_tokens=10, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0].tolist()
            gen = lm.generate(ids[0, :9].numpy(), 10, stop_at_eos=False)[0].tolist()
            res["tiny"] = {"logits_max_abs_err": float(np.abs(got - ref).max()),
                           "logits_max_abs": float(np.abs(ref).max()), "generate_equal": gen == want}
        except Exception as e:  # keep going: report it
            res["tiny"] = f"error: {type(e).__name__}: {e}"
    # 2. the 4096x4096 2-bit kernel
    z = np.load(d / "kernel_4096_b2.npz")
    lib = tvm.runtime.load_module(str(d / "kernel_4096_b2.so"))
    targs = [tvm.runtime.tensor(z["x"], dev)] + [tvm.runtime.tensor(z[f"arg{i}"], dev)
                                                 for i in range(len([k for k in z.files if k.startswith("arg")]))]
    y = tvm.runtime.empty((1, 4096), "float32", dev)
    lib["main"](*targs, y)
    ev = lib.time_evaluator("main", dev, number=200, repeat=5)
    ms = [v * 1e3 for v in ev(*targs, y).results]
    kern = {"max_abs_err_vs_ref": float(np.abs(y.numpy() - z["ref"]).max()), "ref_max_abs": float(np.abs(z["ref"]).max()),
            "tvm_ms": statistics.median(ms), "tvm_spread": [min(ms), max(ms)]}
    try:
        import torch

        from quipc_runtime.packing import unpack

        w = unpack(z["codes"], 2, 4096).astype(np.float32) * z["scale"].astype(np.float32)[:, None] \
            + z["zero"].astype(np.float32)[:, None]  # the dense rotated weight, for cuBLAS timings only
        w = torch.from_numpy(w).cuda()
        xx = torch.from_numpy(z["x"]).cuda()
        for dt, name in ((torch.float32, "torch_dense_fp32_ms"), (torch.float16, "torch_dense_fp16_ms")):
            ww, xv = w.to(dt), xx.to(dt)
            for _ in range(10):
                ww @ xv.T
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                ww @ xv.T
            torch.cuda.synchronize()
            kern[name] = (time.perf_counter() - t0) / 200 * 1e3
    except Exception as e:
        kern["torch"] = f"error: {e}"
    res["kernel_4096_b2"] = kern
    # 3. SmolLM2-shaped model (random parameters of the real shapes): decode latency
    if (d / "model_cuda").exists():
        try:
            mdir = d / "model_cuda"
            shapes = json.loads((mdir / "param_shapes.json").read_text())
            rng = np.random.default_rng(0)
            params = {}
            for k, (shape, dtype) in shapes.items():
                if dtype == "int32":
                    params[k] = tvm.runtime.tensor(rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int64).astype(np.int32))
                else:
                    params[k] = tvm.runtime.tensor((rng.standard_normal(shape) * 0.02).astype(np.float32))
            tvm.runtime.save_param_dict_to_file(params, str(mdir / "params.bin"))
            lm = TvmLM(mdir)
            ids = rng.integers(0, 30000, 128)
            runs = []
            for _ in range(4):
                cache = lm.new_cache(128 + 33)
                t0 = time.perf_counter()
                logits = lm.prefill(ids, cache)
                t1 = time.perf_counter()
                tok, pos = int(logits.argmax()), 128
                for _ in range(32):
                    tok = int(lm.decode(tok, pos, cache).argmax())
                    pos += 1
                t2 = time.perf_counter()
                runs.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3 / 32))
            runs = runs[1:]
            res["smollm2_shaped_w2"] = {"prefill_128_ms": statistics.median(r[0] for r in runs),
                                        "decode_ms": statistics.median(r[1] for r in runs),
                                        "reps": len(runs), "note": "random parameters of the real shapes"}
        except Exception as e:
            res["smollm2_shaped_w2"] = f"error: {type(e).__name__}: {e}"
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("prepare")
    g.add_argument("dir")
    g.add_argument("--target", default="cuda:sm_90")
    g.add_argument("--tiny", default=None, help="a tiny artifact folder")
    g.add_argument("--model", default=None, help="a SmolLM2 artifact (only its shapes travel)")
    g.set_defaults(fn=cmd_gpu_prepare)
    c = sub.add_parser("check")
    c.add_argument("dir")
    c.add_argument("--out", default=None)
    c.set_defaults(fn=cmd_gpu_check)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
