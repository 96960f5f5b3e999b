"""Where an ONNX model's decode time goes, from onnxruntime's profiler: node time per token by
op type, and for the quantized linears (QuipLinear, QuipLinearGroup, MatMulNBits) by node name
with the layer numbers folded (model.layers.N.mlp.down_proj, ...). A 64-token prompt, then
--steps decode steps with the KV cache at batch 1; the prefill run is left out. Each file runs as
`quipc bench` runs it (quipc_runtime.onnx_runtime.OnnxLM: the custom-op library when built).

Profiling slows every node (whole-run times come out ~2x the unprofiled ones), so compare files
by their shares and by op against op, not with onnx_bench's ms per token.

    python benchmarks/onnx_decode_profile.py W/quipc_art_w4 W/ort_rtn_b128 --threads 2 [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "runtime"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

LINEAR_OPS = ("QuipLinear", "QuipLinearGroup", "MatMulNBits")
PROMPT = 64


def profile_decode(model: str, threads: int, steps: int, folder: Path, custom_ops: bool | None = None) -> dict:
    """custom_ops: OnnxLM's (None: the library when built and it runs the file's formats)."""
    from quipc_runtime.onnx_runtime import OnnxLM

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    lm = OnnxLM(model, threads=threads, custom_ops=custom_ops, profile_prefix=str(folder / "prof"))
    last, past = lm.prefill((3 + np.arange(PROMPT, dtype=np.int64) % 50)[None])   # ids any vocabulary has
    for i in range(steps):
        last, past = lm.decode(int(np.argmax(last)), past, PROMPT + i)
    prof = Path(lm.session.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    start = runs[1]["ts"]   # runs[0] is the prefill
    by_op: dict = {}
    by_node: dict = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e["args"]["op_name"]
        by_op[op] = by_op.get(op, 0) + e["dur"]
        if op in LINEAR_OPS:
            key = f"{op} {re.sub(r'[0-9]+', 'N', e['name'][:-len('_kernel_time')])}"
            by_node.setdefault(key, []).append(e["dur"])
    return {"model": str(model), "custom_ops": lm.custom_ops, "steps": steps,
            "model_run_ms": float(np.median([r["dur"] for r in runs[1:]])) / 1000,
            "node_ms_per_token": sum(by_op.values()) / steps / 1000,
            "ops_ms_per_token": {k: round(v / steps / 1000, 4) for k, v in sorted(by_op.items(), key=lambda x: -x[1])},
            "linears": {k: {"per_token": len(v) / steps, "median_us": float(np.median(v)),
                            "ms_per_token": round(sum(v) / steps / 1000, 4)}
                        for k, v in sorted(by_node.items(), key=lambda x: -sum(x[1]))}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help=".onnx files or folders holding model.onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            r = profile_decode(m, args.threads, args.steps, Path(tmp))
            out.append(r)
            print(f"{m}: run {r['model_run_ms']:.2f} ms, nodes {r['node_ms_per_token']:.2f} ms a token (profiled)")
            for op, ms in list(r["ops_ms_per_token"].items())[:8]:
                print(f"  {op:30s} {ms:.3f} ms")
            for k, v in r["linears"].items():
                print(f"  {k:70s} x{v['per_token']:.0f} median {v['median_us']:.0f} us, {v['ms_per_token']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "prompt": PROMPT, "files": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
