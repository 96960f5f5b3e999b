"""benchmarks/onnx_op_chain.py: chains of nodes with their own weights, timed without the profiler."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("onnxruntime")


def test_chains_alternate_shapes_and_run_with_and_without_the_library():
    import onnx

    from onnx_op_chain import nbits_chain, quipc_chain, session
    from quipc_runtime import ort_custom_ops

    ref = nbits_chain(64, 96, 3)
    assert [(a.i) for n in ref.graph.node for a in n.attribute if a.name in ("K", "N")] == [64, 96, 96, 64, 64, 96]
    x = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)
    assert session(ref, 1, False).run(None, {"x0": x})[0].shape == (1, 1, 96)
    for fmt, bits in (("e8p", 2), ("grid", 4), ("trellis", 4)):
        model = quipc_chain(64, 96, 3, fmt, bits)
        onnx.checker.check_model(model)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuipLinear") == 3 and len(set(n.input[1] for n in model.graph.node)) == 3  # own weights
        bodies = session(model, 1, False).run(None, {"x0": x})[0]      # stock onnxruntime: function bodies
        assert bodies.shape == (1, 1, 96) and np.isfinite(bodies).all()
        if ort_custom_ops.available():
            lib = session(model, 1, True).run(None, {"x0": x})[0]
            assert np.abs(lib - bodies).max() <= 0.05 * np.abs(bodies).max()


def test_rows_name_every_format_against_matmulnbits():
    from onnx_op_chain import FORMATS, chain_rows
    from quipc_runtime import ort_custom_ops

    if not ort_custom_ops.available():
        pytest.skip("the custom-op library is not built")
    rows = chain_rows([(64, 64)], threads=1, nodes=2, rounds=2, runs=3)
    assert [r["op"] for r in rows] == ["MatMulNBits_b32"] + [f"{f} w{b}" for f, b in FORMATS]
    assert rows[0]["ratio"] == 1.0 and all(r["us"] > 0 and r["shape"] == "64x64" for r in rows)
