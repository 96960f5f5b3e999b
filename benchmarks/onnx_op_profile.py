"""Per-op latency from onnxruntime's profiler at batch 1 (one token), onnxruntime CPU:
- a quipc QuipLinear node run by the custom-op library (transforms, signs and scales
  included), e8p 2-bit, grid 2- and 4-bit, trellis 3- and 4-bit (the --calib defaults), against
  onnxruntime's MatMulNBits 4-bit block 32 (accuracy_level 4, its fastest CPU path) on the same
  shape;
- a QuipLinearGroup (q/k/v-like and gate/up-like) against the sum of its parts as
  separate QuipLinear nodes.
Random weights (latency does not depend on their values); the median node time over --runs.

    python benchmarks/onnx_op_profile.py --threads 2 --runs 200
(also `python benchmarks/onnx_bench.py ... --op-profile`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "runtime"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SHAPES = [(576, 576), (576, 1536), (1536, 576)]      # (in_features K, out_features N)
GROUPS = [(576, (576, 192, 192)), (576, (1536, 1536))]


def quipc_layer(m: int, n: int, fmt: str, bits: int, seed: int, t_in=None, in_scale=None, name="blk.0.proj"):
    from quipc_runtime.formats.e8p import STAGES
    from quipc_runtime.layer import QuantizedLinear
    from quipc_runtime.transforms import Transform

    rng = np.random.default_rng(seed)
    row = (n + 7) // 8 * bits
    e8p, trellis = fmt == "e8p", fmt == "trellis"   # any bytes are a valid trellis bitstream
    return QuantizedLinear(
        name=name, out_features=m, in_features=n, bits=bits, format=fmt,
        codes=rng.integers(0, 256, size=(m, row), dtype=np.uint8),
        scale=rng.uniform(0.02, 0.2, size=(m, len(STAGES[bits])) if e8p else (m, 1) if trellis else m
                          ).astype(np.float16),
        zero=None if e8p or trellis else rng.uniform(-0.2, 0, m).astype(np.float16),
        t_in=t_in or Transform.make("hadamard", n, seed + 1), t_out=Transform.make("hadamard", m, seed + 2),
        in_scale=in_scale if in_scale is not None else rng.uniform(0.5, 2, n).astype(np.float16), bias=None)


def quipc_model(layers, group: bool):
    import onnx
    from onnx import TensorProto, helper

    from quipc.backends.onnx.builder import Builder
    from quipc.backends.onnx.emitter import QuipLinearEmitter

    b = Builder()
    em = QuipLinearEmitter(b, accuracy_level=4)
    names = [f"y{i}" for i in range(len(layers))]
    if group:
        em.emit_group("x", layers, out_names=names, rank=3)
    else:
        for la, o in zip(layers, names):
            em.emit("x", la, out_name=o, rank=3)
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, layers[0].in_features])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 1, la.out_features]) for o, la in zip(names, layers)],
        list(b.initializers.values()))
    model = helper.make_model(graph, opset_imports=em.opsets(), functions=list(em.functions.values()))
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def nbits_model(n: int, m: int, block: int = 32):
    """One com.microsoft MatMulNBits, 4 bits, symmetric (default zero point 8)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = n // block
    b = numpy_helper.from_array(rng.integers(0, 256, (m, blocks, block // 2), dtype=np.uint8), "B")
    s = numpy_helper.from_array(rng.uniform(0.01, 0.1, m * blocks).astype(np.float32), "scales")
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=n, N=m,
                            bits=4, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, m])], [b, s])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def node_times_us(model, custom_ops: bool, threads: int, runs: int, folder: Path) -> dict:
    """Median kernel time (microseconds) per node name, from onnxruntime's profiler."""
    import onnxruntime as ort

    from quipc_runtime import ort_custom_ops

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if custom_ops:
        ort_custom_ops.register(so, threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(folder / "prof")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 1, sess.get_inputs()[0].shape[2])).astype(np.float32)
    for _ in range(runs):
        sess.run(None, {"x": x})
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    times: dict = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times.setdefault((e["name"], e["args"]["op_name"]), []).append(e["dur"])
    return {k: float(np.median(v[len(v) // 10:])) for k, v in times.items()}   # first 10%: warm-up


def total_us(times: dict, op: str) -> float:
    return sum(t for (_, o), t in times.items() if o == op)


def profile_ops(folder: Path, threads: int = 2, runs: int = 200) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, m in SHAPES:
        ref = total_us(node_times_us(nbits_model(n, m), False, threads, runs, folder), "MatMulNBits")
        for fmt, bits in (("e8p", 2), ("grid", 2), ("grid", 4), ("trellis", 3), ("trellis", 4)):
            model = quipc_model([quipc_layer(m, n, fmt, bits, seed=0)], group=False)
            t = total_us(node_times_us(model, True, threads, runs, folder), "QuipLinear")
            rows.append({"op": f"QuipLinear {fmt} w{bits}", "shape": f"{n}x{m}", "us": round(t, 2),
                         "MatMulNBits_b32_us": round(ref, 2), "ratio": round(t / ref, 3)})
    for n, outs in GROUPS:
        head = quipc_layer(outs[0], n, "e8p", 2, seed=0, name="blk.0.p0")
        layers = [head] + [quipc_layer(m, n, "e8p", 2, seed=i, t_in=head.t_in, in_scale=head.in_scale,
                                       name=f"blk.0.p{i}") for i, m in enumerate(outs[1:], 1)]
        grouped = total_us(node_times_us(quipc_model(layers, True), True, threads, runs, folder), "QuipLinearGroup")
        parts = total_us(node_times_us(quipc_model(layers, False), True, threads, runs, folder), "QuipLinear")
        rows.append({"op": "QuipLinearGroup e8p w2", "shape": f"{n}x{'+'.join(map(str, outs))}",
                     "us": round(grouped, 2), "parts_us": round(parts, 2), "ratio": round(grouped / parts, 3)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--work", default="/tmp/quipc_op_profile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = profile_ops(Path(args.work), args.threads, args.runs)
    for r in rows:
        print(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
