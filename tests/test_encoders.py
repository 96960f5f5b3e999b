"""Encoders (quipc.passes.encoders) end to end: an e8p compile of the tiny model loads on the
torch path and computes its stored weights; the other backends compute the same."""
import json

import numpy as np
import pytest
import torch

import quipc
from quipc.cli import main
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc_runtime import artifact as art


@pytest.fixture(scope="module")
def e8p_artifact(tiny_model, tmp_path_factory):
    model, text = tiny_model
    out = tmp_path_factory.mktemp("e8p") / "w2"
    compile_model(str(model), out, QuantConfig(bits=2, format="e8p", seed=1),
                  CalibConfig(text=str(text), windows=8, length=32), progress=False)
    return out


def test_e8p_artifact_records_format_and_beats_rtn(e8p_artifact):
    man = json.loads((e8p_artifact / "manifest.json").read_text())
    assert man["format_version"] == art.FORMAT_VERSION and man["quant_config"]["format"] == "e8p"
    layers = [l for b in man["blocks"] for l in b["layers"]]
    assert layers and all(l["format"] == "e8p" for l in layers)
    assert all(l["proxy_loss"] < l["proxy_loss_rtn"] for l in layers)


def test_e8p_model_computes_its_effective_weights(tiny_model, e8p_artifact):
    from transformers import AutoModelForCausalLM

    model = quipc.load(e8p_artifact)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32)
    for name, layer in art.load_layers(e8p_artifact, art.read_manifest(e8p_artifact)).items():
        ref.get_submodule(name).weight.data = torch.from_numpy(layer.effective_weight()).float()
    ids = torch.randint(3, 17, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=2e-4, rtol=1e-4)


def test_every_backend_runs_an_e8p_artifact(e8p_artifact, tmp_path):
    """The kernels runtime and the ONNX export compute what the torch path computes (per-backend
    tests: tests/test_kernels*.py, test_onnx_e8p.py, test_tvm_e8p.py)."""
    from quipc_runtime import kernels as K

    ids = torch.randint(3, 17, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = quipc.load(e8p_artifact)(ids).logits
        if K.available():
            got = quipc.load(e8p_artifact, backend="kernels")(ids).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    pytest.importorskip("onnx")
    from quipc.backends.lower import lower_artifact   # --graph auto: what a user gets
    from quipc_runtime.onnx_runtime import OnnxLM

    out = lower_artifact(e8p_artifact, tmp_path / "onnx", target="onnx", progress=False, accuracy_level=0)
    got = np.asarray(OnnxLM(out, threads=1).logits(ids.numpy())).reshape(want.shape)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_cli_format_flag(tiny_model, tmp_path, capsys):
    model, text = tiny_model
    assert main(["compile", str(model), "-o", str(tmp_path / "a"), "--bits", "3", "--format", "e8p",
                 "--calib", str(text), "--calib-windows", "4", "--calib-len", "16", "--no-progress",
                 "--head-bits", "32", "--embed-bits", "32"]) == 0
    assert main(["compile", str(model), "-o", str(tmp_path / "b"), "--format", "nope",
                 "--no-progress"]) == 1
    assert "unknown code format 'nope'" in capsys.readouterr().err


def test_auto_format_picks_per_layer_the_first_format_that_stores_it():
    from quipc.passes.encoders import resolve_format

    assert resolve_format("auto", 2, 576, 1536) == "trellis"
    assert resolve_format("auto", 3, 48, 24) == "e8p"      # 24 rows: no whole 16x16 tiles
    assert resolve_format("auto", 4, 20, 32) == "grid"     # 20 columns: no groups of 8
    assert resolve_format("trellis", 2, 48, 24) == "trellis"  # an explicit format is kept (and refused later)
    QuantConfig(bits=2, format="auto").validate()
    with pytest.raises(ValueError, match="unknown code format 'automatic'"):
        QuantConfig(bits=2, format="automatic").validate()


def test_auto_format_mixes_formats_and_every_backend_runs_the_model(tiny_model, tmp_path):
    """The tiny model's k/v projections (24 x 48) are not whole trellis tiles: auto stores them
    as e8p, the rest as trellis; the torch path, the kernels, ONNX and TVM compute the same model."""
    from quipc_runtime import kernels as K

    model, text = tiny_model
    out = tmp_path / "auto"
    compile_model(str(model), out, QuantConfig(bits=2, format="auto", seed=1),
                  CalibConfig(text=str(text), windows=8, length=32), progress=False)
    man = json.loads((out / "manifest.json").read_text())
    formats = {l["name"].rsplit(".", 1)[-1]: l["format"] for b in man["blocks"] for l in b["layers"]}
    assert formats == {"q_proj": "trellis", "k_proj": "e8p", "v_proj": "e8p", "o_proj": "trellis",
                       "gate_proj": "trellis", "up_proj": "trellis", "down_proj": "trellis"}
    ids = torch.randint(3, 17, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = quipc.load(out)(ids).logits
        if K.available():
            torch.testing.assert_close(quipc.load(out, backend="kernels")(ids).logits, want, atol=1e-4, rtol=1e-4)
    pytest.importorskip("onnx")
    from quipc.backends.lower import lower_artifact   # --graph auto: what a user gets
    from quipc_runtime.onnx_runtime import OnnxLM

    onnx_out = lower_artifact(out, tmp_path / "onnx", target="onnx", progress=False, accuracy_level=0)
    got = np.asarray(OnnxLM(onnx_out, threads=1).logits(ids.numpy())).reshape(want.shape)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    pytest.importorskip("tvm")
    from quipc.backends.tvm import compile_artifact
    from quipc_runtime.tvm_runtime import TvmLM
    from test_tvm import assert_matches_torch_path

    tvm_out = compile_artifact(out, tmp_path / "tvm", progress=False)
    assert json.loads((tvm_out / "tvm_config.json").read_text())["formats"] == ["e8p", "trellis"]
    assert_matches_torch_path(quipc.load(out), TvmLM(tvm_out, threads=2), new_tokens=4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_row_separable_encoders_round_a_run_of_rows_as_the_whole(bits):
    """What lets ranks share a layer's rows (passes/spread.encode_rows): for every encoder
    registered row-separable, rows [a, b) encoded alone give the floats they get in the whole."""
    from quipc.passes.encoders import ROW_SEPARABLE, encode

    assert {"grid", "e8p"} <= ROW_SEPARABLE
    g = torch.Generator().manual_seed(bits)
    n, m = 64, 300
    x = torch.randn(512, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    h = x.T @ x / 512 + 0.01 * torch.eye(n, dtype=torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.05
    for fmt in sorted(ROW_SEPARABLE):
        cfg = QuantConfig(bits=bits, format=fmt)
        for hess in (h, None):
            whole = encode(fmt, w, hess, cfg)
            parts = [encode(fmt, w[a:b], hess, cfg) for a, b in ((0, 128), (128, 256), (256, m))]
            for field in ("codes", "scale", "zero"):
                if getattr(whole, field) is None:
                    assert all(getattr(p, field) is None for p in parts)
                else:
                    assert np.array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field))
            assert torch.equal(torch.cat([p.values for p in parts]), whole.values), (fmt, hess is None)
