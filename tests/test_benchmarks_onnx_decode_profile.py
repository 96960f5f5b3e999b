"""benchmarks/onnx_decode_profile.py: onnxruntime's profiler over decode steps (OnnxLM's
profile_prefix), the prefill run left out."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("custom_ops", [True, False])
def test_every_linear_node_is_counted_once_a_decode_step(tied_w3, tmp_path, custom_ops):
    pytest.importorskip("onnxruntime")
    import onnx

    from onnx_decode_profile import LINEAR_OPS, profile_decode
    from quipc.backends.lower import lower_artifact
    from quipc_runtime import ort_custom_ops

    if custom_ops and not ort_custom_ops.available():
        pytest.skip("the custom-op library is not built")
    out = lower_artifact(tied_w3, tmp_path / "onnx", target="onnx", progress=False)
    nodes = [n for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type in LINEAR_OPS]
    r = profile_decode(str(out), threads=1, steps=3, folder=tmp_path, custom_ops=custom_ops)
    assert r["custom_ops"] == custom_ops and r["steps"] == 3
    if custom_ops:   # the library runs each node as one kernel: each once a step, no prefill run
        assert sum(v["per_token"] for v in r["linears"].values()) == len(nodes) > 0
        assert set(r["ops_ms_per_token"]) >= {n.op_type for n in nodes}
    else:            # stock onnxruntime inlines the nodes' function bodies (their MatMulNBits)
        assert not {"QuipLinear", "QuipLinearGroup"} & set(r["ops_ms_per_token"])
        assert r["linears"] and all(k.startswith("MatMulNBits ") for k in r["linears"])
    assert r["node_ms_per_token"] > 0 and not list(tmp_path.glob("prof*.json"))
