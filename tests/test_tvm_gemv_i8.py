"""The 4-bit decode GEMV on int8 activations (quipc/backends/tvm/gemv_i8.py): exact where the
activations are exactly int8 steps, within the quantization bound otherwise, every lowering
that uses it (grid, 2-bit e8p as grid, the two stages of a 4-bit e8p layer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from quipc_runtime.modules import QuipLinearRef  # noqa: E402

from e8p_layers import random_e8p_layer  # noqa: E402
from test_tvm import random_layer, run_kernel  # noqa: E402


def _avx2() -> bool:
    from quipc.backends.tvm import gemv_i8
    from quipc.backends.tvm.build import resolve_target

    return gemv_i8.supported(resolve_target("llvm"))


needs_avx2 = pytest.mark.skipif(not _avx2(), reason="the int8 GEMV needs an x86 CPU with AVX2")


def test_supported_only_on_x86_llvm():
    from quipc.backends.tvm import gemv_i8

    assert not gemv_i8.supported(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    assert not gemv_i8.supported(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu",
                                                    "mcpu": "core2"}))
    assert gemv_i8.supported(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu",
                                                "mcpu": "haswell"}))


@needs_avx2
@pytest.mark.parametrize("shape", [(48, 96), (40, 72), (576, 192)])
def test_exact_on_int8_activations(shape):
    """Identity transforms, no input scale, integer x with max |x| = 127: the quantization step
    is 1 and zq = x, so the int8 kernel must give the fp32 reference to float rounding."""
    m, n = shape
    layer = random_layer(m, n, 4, kind="identity", bias=True, in_scale=False)
    rng = np.random.default_rng(11)
    x = rng.integers(-127, 128, (1, n)).astype(np.float32)
    x[0, 3] = 127.0
    _, y = run_kernel(layer, "gemv", 1, x=x, int8_acts=True)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@needs_avx2
@pytest.mark.parametrize("shape", [(48, 96), (576, 192), (40, 72)])
def test_within_quantization_bound(shape):
    """Random x through Hadamard transforms: the only error is z's rounding to int8 steps, so
    |y - ref| <= s_out * (|scale| |codes| + |zero|) . |z - step zq|, with |z - step zq| <= step / 2,
    bounded here by the fp32 kernel's output against a loose multiple; and the fp32 kernel
    of the same spec stays exact."""
    m, n = shape
    layer = random_layer(m, n, 4)
    x, y8 = run_kernel(layer, "gemv", 1, int8_acts=True)
    _, y32 = run_kernel(layer, "gemv", 1, int8_acts=False)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y32, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    err = np.abs(y8 - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.02, err   # not exact (it is int8), and not wrong
    assert np.corrcoef(y8.ravel(), ref.ravel())[0, 1] > 0.9999


@needs_avx2
@pytest.mark.parametrize("bits,shape,rows", [(2, (576, 576), 1), (4, (576, 576), 1), (2, (40, 72), 3),
                                             (4, (40, 72), 3)])
def test_e8p_layers_on_the_grid(bits, shape, rows):
    """2-bit e8p layers (as_grid4) and the two stages of 4-bit ones (as_grid4x2, one quantization
    for both) on int8 activations: the fp32 kernel of the same layer exact, the int8 one close;
    several rows quantize each row with its own step."""
    import test_tvm_e8p

    from quipc.backends.tvm.e8p_as_grid import kernel_layers

    layer = random_e8p_layer(*shape, bits, seed=5)
    mapped = kernel_layers({"l": layer})["l"]
    assert mapped.format == ("grid" if bits == 2 else "grid4x2")
    x = np.random.default_rng(8).normal(size=(rows, shape[1])).astype(np.float32)
    x[1:] *= 100.0                          # rows of very different magnitudes
    _, y8 = test_tvm_e8p.run_kernel(mapped, "gemv", rows, int8_acts=True, x=x)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    for r in range(rows):
        err = np.abs(y8[r] - ref[r]).max() / np.abs(ref[r]).max()
        assert 0 < err < 0.02, (r, err)


@pytest.mark.parametrize("graph", ["traced", "handwritten"])
def test_int8_build_of_a_tiny_model(graph, tmp_path):
    """A build with activations="int8" (traced and hand-written graphs): the config says which
    GEMVs the build runs; on an AVX2 CPU its decode steps stay close to the torch path (the fp32
    builds are held to 1e-4 by test_traced_tvm) and it greedily writes the same tokens."""
    import json

    from traced_families import family_artifact, rel, torch_reference
    from test_traced_tvm import tvm_steps

    from quipc.backends.tvm import compile_artifact
    from quipc.backends.tvm.traced import compile_traced

    build = compile_traced if graph == "traced" else compile_artifact
    artifact = family_artifact("llama")
    path = build(artifact, tmp_path / "tvm", progress=False, activations="int8")
    cfg = json.loads((path / "tvm_config.json").read_text())
    assert cfg["activations"] == ("int8" if _avx2() else "fp32")
    _, want_steps, want_tokens = torch_reference(artifact)
    _, _, steps, tokens = tvm_steps(path)
    worst = max(rel(a, b) for a, b in zip(steps, want_steps))
    assert worst < 3e-2, worst
    if _avx2():
        assert worst > 1e-6      # the int8 GEMVs did run
    assert tokens == want_tokens
    with pytest.raises(ValueError, match="activation type"):
        build(artifact, tmp_path / "bad", progress=False, activations="int4")
