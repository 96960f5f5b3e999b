"""Decode's dense linears in the traced TVM build (quipc/backends/tvm/dense_gemv.py): the kernel
against numpy, and a dense lm_head's decode going through it (its logits against the torch path
are test_traced_tvm's, whose family artifacts keep the head dense)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n", [(40, 64), (1000, 96)])
def test_kernel_matches_numpy(m, n, bias):
    from quipc.backends.tvm import dense_gemv
    from quipc.backends.tvm.build import resolve_target

    lib = tvm.compile(dense_gemv.prim_func(n, m, bias).with_attr("global_symbol", "main"),
                      target=resolve_target("llvm"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, n)).astype(np.float32)
    w = rng.normal(size=(m, n)).astype(np.float32)
    b = rng.normal(size=(m,)).astype(np.float32)
    y = tvm.runtime.empty((1, m), "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(a) for a in ([x, w, b] if bias else [x, w])], y)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-4)


def test_only_one_row_per_sequence_of_a_multiple_of_8():
    from tvm import tirx

    from quipc.backends.tvm.dense_gemv import applies

    batch, seq = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    assert applies([1, 1, 576], 576) and applies([batch, 1, 576], 576)
    assert not applies([1, seq, 576], 576) and not applies([1, 2, 576], 576) and not applies([1, 1, 60], 60)


def test_dense_head_decodes_through_it():
    """The tiny Llama artifact keeps its lm_head dense (head_bits 32): decode calls dense_gemv
    with the (vocab, hidden) table as stored."""
    from traced_families import family_artifact

    from quipc.backends.tvm.traced import build_module

    mod, _ = build_module(family_artifact("llama"))
    names = [gv.name_hint for gv in mod.functions]
    for fn in ("decode", "prefill"):   # prefill: the last row's logits only
        assert any(n.startswith(f"{fn}_dense_gemv") for n in names), names
        assert "dense_gemv" in mod[fn].script()
    assert "dense_gemv" not in mod["forward"].script()   # every row: the GEMM
