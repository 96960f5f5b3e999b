"""Per-node latency at batch 1 without onnxruntime's profiler, onnxruntime CPU: chains of --nodes
nodes, each with its own random weights as a model's layers have (node i maps K -> N for even i,
N -> K for odd: 576x576, 576<->1536 are SmolLM2's shapes), the session's wall time per run
divided by the node count. A quipc QuipLinear run by the custom-op library (e8p 2-bit, grid
4-bit, trellis 4-bit: the defaults' formats) against onnxruntime's MatMulNBits 4-bit block 32
(accuracy_level 4) in the same rounds.

The profiler (benchmarks/onnx_op_profile.py) adds 4-7 microseconds to every node in a 2-thread
session, about a third of a SmolLM2-sized node, and moves between runs; this measures the nodes
as a decode step runs them (each node's inputs and weights not in the cache of the one before).

    python benchmarks/onnx_op_chain.py --threads 2 [--shapes 576x576 576x1536] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "runtime", Path(__file__).resolve().parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

FORMATS = (("e8p", 2), ("grid", 4), ("trellis", 4))


def node_dims(i: int, k: int, n: int) -> tuple[int, int]:
    """(in, out) of chain node i."""
    return (k, n) if i % 2 == 0 else (n, k)


def _graph(nodes, inits, k: int, last: str, opsets, functions=()):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, 1, None])], inits)
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 10
    return model


def nbits_chain(k: int, n: int, count: int, block: int = 32):
    """`count` MatMulNBits (4 bits, block `block`, symmetric) in a row, random weights each."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(count):
        kin, nout = node_dims(i, k, n)
        blocks = kin // block
        inits += [numpy_helper.from_array(rng.integers(0, 256, (nout, blocks, block // 2), dtype=np.uint8), f"B{i}"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.1, nout * blocks).astype(np.float32), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{i}", f"B{i}", f"s{i}"], [f"x{i + 1}"],
                                      domain="com.microsoft", K=kin, N=nout, bits=4, block_size=block,
                                      accuracy_level=4))
    return _graph(nodes, inits, k, f"x{count}", [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def quipc_chain(k: int, n: int, count: int, fmt: str, bits: int):
    """`count` QuipLinear nodes in a row (quipc's emitter, accuracy_level 4), random codes each."""
    from onnx_op_profile import quipc_layer
    from quipc.backends.onnx.builder import Builder
    from quipc.backends.onnx.emitter import QuipLinearEmitter

    b = Builder()
    em = QuipLinearEmitter(b, accuracy_level=4)
    x = "x0"
    for i in range(count):
        kin, nout = node_dims(i, k, n)
        x = em.emit(x, quipc_layer(nout, kin, fmt, bits, seed=i, name=f"blk.{i}.proj"), out_name=f"x{i + 1}", rank=3)
    return _graph(b.nodes, list(b.initializers.values()), k, x, em.opsets(), em.functions.values())


def session(model, threads: int, custom_ops: bool):
    import onnxruntime as ort

    from quipc_runtime import ort_custom_ops

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if custom_ops:
        ort_custom_ops.register(so, threads)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def chain_rows(shapes, threads: int = 2, nodes: int = 30, rounds: int = 10, runs: int = 200) -> list[dict]:
    """Per shape: microseconds a node (median over rounds of the median run), quipc's formats and
    their ratio to MatMulNBits block 32, the sessions interleaved round by round."""
    from quipc_runtime import ort_custom_ops

    if not ort_custom_ops.available():
        raise RuntimeError("the custom-op library is not built: `bash scripts/setup.sh`")
    rows = []
    for k, n in shapes:
        sessions = {"MatMulNBits_b32": session(nbits_chain(k, n, nodes), threads, False)}
        for fmt, bits in FORMATS:
            sessions[f"{fmt} w{bits}"] = session(quipc_chain(k, n, nodes, fmt, bits), threads, True)
        x = np.random.default_rng(1).standard_normal((1, 1, k)).astype(np.float32) * 0.1
        times = {name: [] for name in sessions}
        for r in range(rounds):
            order = list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))
            for name in order:
                s = sessions[name]
                for _ in range(max(1, runs // 10)):   # warm-up
                    s.run(None, {"x0": x})
                t = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    s.run(None, {"x0": x})
                    t.append(time.perf_counter() - t0)
                times[name].append(statistics.median(t) / nodes * 1e6)
        ref = statistics.median(times["MatMulNBits_b32"])
        for name, v in times.items():
            us = statistics.median(v)
            rows.append({"op": name, "shape": f"{k}x{n}" + ("" if k == n else f"<->{n}x{k}"), "us": round(us, 2),
                         "ratio": round(us / ref, 3)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["576x576", "576x1536"], help="KxN: node i maps K -> N, i odd N -> K")
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    rows = chain_rows(shapes, args.threads, args.nodes, args.rounds, args.runs)
    for r in rows:
        print(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "nodes": args.nodes, "rounds": args.rounds,
                                               "runs": args.runs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
