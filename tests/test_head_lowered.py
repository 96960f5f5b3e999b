"""A quantized lm_head and embedding lowered: the ONNX export (function bodies and the
custom-op library, which runs a trellis head's GEMV on the 8-bit copy of its rows) and the
TVM build, each against the torch path of the same artifact."""
import json

import numpy as np
import pytest
import torch

import quipc
from test_head import _artifact_for, logits


def test_onnx_library_runs_a_trellis_head_on_its_rows_rounded_to_8_bits(tiny_model, tied_w3, tmp_path):
    """The custom-op library takes the 8-bit copy for the lm_head node as quipc_runtime does:
    one token's logits (the GEMV) within the rounding of the torch path's, the function bodies
    (stock onnxruntime) exact."""
    pytest.importorskip("onnxruntime")
    from quipc.backends.lower import lower_artifact
    from quipc_runtime import ort_custom_ops
    from quipc_runtime.onnx_runtime import OnnxLM

    if not ort_custom_ops.available():
        pytest.skip("the custom-op library is not built")
    artifact = _artifact_for(tiny_model, tied_w3, tmp_path, 4, "auto", "trellis")
    out = lower_artifact(artifact, tmp_path / "onnx", target="onnx", progress=False, accuracy_level=0)
    ids = torch.randint(3, 17, (1, 1), generator=torch.Generator().manual_seed(0))
    want = logits(quipc.load(artifact), ids)[0].numpy()
    lib, bodies = OnnxLM(out, threads=1), OnnxLM(out, threads=1, custom_ops=False)
    assert lib.custom_ops and not bodies.custom_ops
    np.testing.assert_allclose(np.asarray(bodies.logits(ids.numpy())).reshape(1, -1), want, atol=1e-4, rtol=1e-4)
    got = np.asarray(lib.logits(ids.numpy())).reshape(1, -1)
    assert not np.allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, want, atol=3e-2 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("head_bits,embed_bits,head_format", [
    (4, "auto", "grid"), (3, "auto", "grid"), (2, "4", "grid"), (32, "8", "grid"),
    (4, "auto", "e8p"), (4, "auto", "trellis"), (2, "auto", "trellis")])
def test_onnx_runs_quantized_head_and_embedding(tiny_model, tied_w3, tmp_path, head_bits, embed_bits,
                                                 head_format):
    """The ONNX export: lm_head as a QuipLinear node, the embedding as a gather of code rows +
    dequantize (+ inverse input transform): the torch path's logits."""
    from quipc.backends.lower import lower_artifact   # --graph auto: what a user gets
    from quipc_runtime.onnx_runtime import OnnxLM

    artifact = _artifact_for(tiny_model, tied_w3, tmp_path, head_bits, embed_bits, head_format)
    out = lower_artifact(artifact, tmp_path / "onnx", target="onnx", progress=False, accuracy_level=0)
    if embed_bits == "auto":  # the shared table is stored once: the lm_head node's initializers
        import onnx

        inits = [i.name for i in onnx.load(str(out), load_external_data=False).graph.initializer]
        assert "lm_head.codes" in inits and not any(i.startswith("model.embed_tokens") for i in inits)
    ids = torch.randint(3, 17, (1, 20), generator=torch.Generator().manual_seed(0))
    got = np.asarray(OnnxLM(out, threads=1).logits(ids.numpy())).reshape(20, -1)
    np.testing.assert_allclose(got, logits(quipc.load(artifact), ids)[0].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_bits,embed_bits,head_format", [
    (4, "auto", "grid"), (32, "8", "grid"), (4, "auto", "e8p"), (4, "auto", "trellis")])
def test_tvm_runs_quantized_head_and_embedding(tiny_model, tied_w3, tmp_path, head_bits, embed_bits, head_format):
    """TVM: the quantized lm_head as one more QuIP linear; the embedding decoded from the grid
    or e8p head's own params (no dense table in the build), else dequantized at build."""
    pytest.importorskip("tvm")
    from quipc.backends.tvm import compile_artifact
    from quipc_runtime.tvm_runtime import TvmLM

    artifact = _artifact_for(tiny_model, tied_w3, tmp_path, head_bits, embed_bits, head_format)
    out = tmp_path / "tvm"
    compile_artifact(artifact, out, progress=False)
    names = json.loads((out / "tvm_config.json").read_text())["param_names"]
    from_head = embed_bits == "auto" and head_format in ("grid", "e8p")
    assert ("embed" not in names) == from_head and any(n.startswith("embed_k") for n in names) == from_head
    ids = torch.randint(3, 17, (1, 20), generator=torch.Generator().manual_seed(0))
    got = np.asarray(TvmLM(out, threads=1).logits(ids.numpy())).reshape(20, -1)
    np.testing.assert_allclose(got, logits(quipc.load(artifact), ids)[0].numpy(), atol=1e-4, rtol=1e-4)
