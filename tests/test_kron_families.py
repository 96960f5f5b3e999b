"""Hidden sizes with no Hadamard factorization (traced_families.KRON_SIZES: 52, 184, 26): QuIP's
incoherence falls back to Kronecker products of random orthogonal factors, and the artifact
compiles, loads on the torch path, and every backend runs it as the torch path does (prefill
and KV-cache decode): the traced ONNX graph, the C++ kernels runtime and the traced TVM build.
None refuses a kron transform."""
from __future__ import annotations

import pytest

from test_traced_onnx import TOL, check_against_torch, export
from traced_families import KRON_SIZES, family_artifact, rel, torch_reference

KRON_FAMILIES = ["llama", "qwen2"]   # qwen2: its q/k/v biases around kron transforms


@pytest.fixture(scope="module", params=KRON_FAMILIES)
def kron_artifact(request):
    return family_artifact(request.param, kron=True)


def test_every_transform_is_kron(kron_artifact):
    from quipc_runtime import artifact as art
    from quipc_runtime.hadamard import split_order

    assert all(split_order(KRON_SIZES[k]) is None for k in ("hidden_size", "intermediate_size"))
    layers = art.load_layers(kron_artifact, art.read_manifest(kron_artifact))
    assert len(layers) == 14
    kinds = {(name, side): t.kind for name, layer in layers.items() for side, t in (("in", layer.t_in),
                                                                                   ("out", layer.t_out))}
    assert set(kinds.values()) == {"kron"}, kinds
    assert layers["model.layers.0.mlp.down_proj"].t_in.orders == (8, 23)
    assert layers["model.layers.0.self_attn.k_proj"].t_out.orders == (2, 13)


def test_traced_onnx_matches_torch(kron_artifact):
    check_against_torch(kron_artifact, export(kron_artifact, kron_artifact.parent / "onnx"))


def test_kernels_runtime_matches_torch(kron_artifact):
    kernels = pytest.importorskip("quipc_runtime.kernels")
    if not kernels.available():
        pytest.skip("the C++ kernels are not built")
    want_full, want_steps, want_tokens = torch_reference(kron_artifact)
    full, steps, tokens = torch_reference(kron_artifact, backend="kernels")
    assert rel(full, want_full) < TOL
    assert max(rel(a, b) for a, b in zip(steps, want_steps)) < TOL
    assert tokens == want_tokens


def test_traced_tvm_matches_torch(tmp_path):
    """The traced TVM build (one family: a build takes ~15 s), kron stages as TIR kernels."""
    pytest.importorskip("tvm")
    from quipc.backends.tvm.traced import compile_traced
    from test_traced_tvm import check_against_torch as check_tvm

    artifact = family_artifact("qwen2", kron=True)
    check_tvm(artifact, compile_traced(artifact, tmp_path / "tvm", progress=False), "TracedTvmLM")
