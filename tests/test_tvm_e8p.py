"""TVM backend, code format "e8p": the TIR decode-matmul against the reference decoder (torch
path, QuipLinearRef over QuantizedLinear.rotated_weight), and a tiny e8p model built to TVM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from quipc_runtime.formats.lattice import e8p_table  # noqa: E402
from quipc_runtime.modules import QuipLinearRef  # noqa: E402
from e8p_layers import random_e8p_layer  # noqa: E402
from test_tvm import assert_matches_torch_path  # noqa: E402


def run_kernel(layer, mode, rows, residual=None, int8_acts=False, x=None):
    import dataclasses

    from quipc.backends.tvm.build import resolve_target
    from quipc.backends.tvm.lowering import linear_prim_func, lowering
    from quipc.backends.tvm.schedules import schedule_func
    from quipc.backends.tvm.tir_quip_linear import LinearSpec

    spec = dataclasses.replace(LinearSpec.of(layer), int8_acts=int8_acts)
    low = lowering(spec.format)
    func = linear_prim_func(spec, mode, rows=rows if mode == "gemv" else None,
                                residual=residual is not None)
    lib = tvm.compile(schedule_func(func).with_attr("global_symbol", "main"), target=resolve_target("llvm"))
    if x is None:
        x = np.random.default_rng(7).normal(size=(rows, layer.in_features)).astype(np.float32)
    params = low.linear_params(layer, spec)
    args = [x] + [params[k] for k in low.param_names(spec)] + ([residual] if residual is not None else [])
    y = tvm.runtime.empty((rows, layer.out_features), "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(a) for a in args], y)
    return x, y.numpy()


def check(layer, mode, rows, residual=None):
    x, y = run_kernel(layer, mode, rows, residual)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    if residual is not None:
        ref = ref + residual
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,mode,rows", [
    ((576, 576), "gemv", 1), ((576, 576), "gemm", 32),
    ((40, 72), "gemv", 3),   # rows not a multiple of the tiles, columns not of 64
    ((40, 72), "gemm", 16),
])
def test_kernel_matches_reference_decoder(bits, shape, mode, rows):
    check(random_e8p_layer(*shape, bits, seed=bits), mode, rows)


def test_kernel_kron_identity_and_residual():
    check(random_e8p_layer(24, 48, 3, kin="kron", kout="kron", bias=False), "gemv", 2)
    res = np.random.default_rng(3).normal(size=(1, 32)).astype(np.float32)
    layer = random_e8p_layer(32, 64, 2, kin="identity", kout="identity", in_scale=None, bias=False)
    check(layer, "gemv", 1, residual=res)


def test_tables_reproduce_every_e8p_index():
    """The kernel's decode (source table, sign bits flipped, the shift of bit 15) equals the
    format's E8P codebook on all 2^16 indices."""
    from quipc.backends.tvm.tir_e8p_linear import e8p_tables

    t = e8p_tables()
    a = np.arange(1 << 16)
    signed = (t["e8p_src"][a & 255].view(np.uint32) ^ t["e8p_signbits"][a >> 8]).view(np.float32)
    got = signed + np.where(a >= 1 << 15, -0.25, 0.25)[:, None].astype(np.float32)
    np.testing.assert_array_equal(got, e8p_table())


def test_index_repack_roundtrip():
    from quipc.backends.tvm.tir_e8p_linear import ROWS, repack_indices

    idx = np.random.default_rng(0).integers(0, 1 << 16, (20, 9)).astype(np.uint16)
    packed = repack_indices(idx, 32, "uint16")
    assert packed.shape == (32 // ROWS, 9, ROWS)
    back = packed.transpose(0, 2, 1).reshape(32, 9)
    np.testing.assert_array_equal(back[:20], idx)
    assert not back[20:].any()


def test_refusals():
    from quipc.backends.tvm.tir_quip_linear import LinearSpec

    layer = random_e8p_layer(16, 32, 2)
    assert LinearSpec.of(layer).format == "e8p"
    layer.format = "trellis-not-here"
    with pytest.raises(ValueError, match="TVM backend runs the code format.*'trellis-not-here'"):
        LinearSpec.of(layer)
    from quipc.backends.tvm import tir_quip_linear as grid

    with pytest.raises(ValueError, match="stored as 'e8p'"):
        grid.linear_params(random_e8p_layer(16, 32, 2))


@pytest.fixture(scope="module")
def e8p_artifact(tiny_model, tmp_path_factory):
    """A 2-bit e8p artifact of the tiny model with a 3-bit lm_head (its codes also the embedding)."""
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig

    model, text = tiny_model
    out = tmp_path_factory.mktemp("art_e8p") / "w2"
    compile_model(str(model), out, QuantConfig(bits=2, seed=1, format="e8p", head_bits=3),
                  CalibConfig(text=str(text), windows=4, length=32), progress=False)
    return out


def test_whole_model_e8p_logits_and_generation(e8p_artifact, tmp_path):
    import quipc_runtime
    from quipc_runtime.tvm_runtime import TvmLM

    from quipc.backends.tvm import compile_artifact

    from quipc_runtime import artifact as art

    layers = art.load_layers(e8p_artifact, art.read_manifest(e8p_artifact))
    assert {layer.format for layer in layers.values()} == {"e8p"}
    model = quipc_runtime.load(e8p_artifact)
    out = compile_artifact(e8p_artifact, tmp_path / "tvm", progress=False)
    import json

    cfg = json.loads((out / "tvm_config.json").read_text())
    assert cfg["bits"] == [2, 3]
    assert cfg["formats"] == ["e8p", "grid"]  # the blocks' linears are e8p, the quantized head grid
    assert_matches_torch_path(model, TvmLM(out, threads=2), new_tokens=8)
