"""torch.ops.quipc.attention (runtime/quipc_runtime/torch_ops.py) against transformers' eager
attention, and its TIR (quipc/backends/tvm/traced_attention.py) against the op: grouped-query
heads, soft-capping, masks that broadcast over batch / heads / rows, dynamic batch, rows and
positions, head dims with and without 8-lane tiles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quipc_runtime import torch_ops  # noqa: F401  registers torch.ops.quipc.attention

MIN = torch.finfo(torch.float32).min


def _inputs(b, h, kv, s, length, d, mask_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n, t in ((h, s), (kv, length), (kv, length)))
    mask = None
    if mask_shape is not None:
        shape = [{"b": b, "s": s, "l": length, "1": 1}[c] for c in mask_shape]
        hidden = torch.rand(*shape, generator=g) < 0.3
        hidden[..., 0] = False                       # every row sees a position
        mask = torch.where(hidden, MIN, 0.0)
    return q, k, v, mask


class _Module:
    training = False

    def __init__(self, groups):
        self.num_key_value_groups = groups


@pytest.mark.parametrize("kv", [1, 2, 6])
def test_op_is_eager_attention(kv):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v, mask = _inputs(2, 6, kv, 5, 9, 16, "b1sl")
    want, _ = eager_attention_forward(_Module(6 // kv), q, k, v, mask, 0.25)
    got = torch.ops.quipc.attention(q, k, v, mask, 0.25, 0.0)
    assert got.shape == want.shape == (2, 5, 6, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_op_soft_caps_as_gemma2():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v, mask = _inputs(1, 4, 2, 3, 7, 8, "11sl")
    q = q * 20                                       # scores well past the cap
    want, _ = eager_attention_forward(_Module(2), q, k, v, mask, scaling=0.5, softcap=30.0)
    got = torch.ops.quipc.attention(q, k, v, mask, 0.5, 30.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - torch.ops.quipc.attention(q, k, v, mask, 0.5, 0.0)).abs().max() > 1e-2


def test_interface_takes_boolean_masks_and_refuses_sinks():
    q, k, v, mask = _inputs(1, 4, 2, 3, 7, 8, "11sl")
    out, _ = torch_ops.attention_interface(_Module(2), q, k, v, mask == 0, scaling=0.5)
    torch.testing.assert_close(out, torch.ops.quipc.attention(q, k, v, mask, 0.5, 0.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sinks"):
        torch_ops.attention_interface(_Module(2), q, k, v, mask, s_aux=torch.zeros(4))


tvm = pytest.importorskip("tvm")


def _built(h, kv, d, mask_shape, softcap):
    from tvm import te, tirx

    from quipc.backends.tvm import traced_attention

    b, s, length = (tirx.Var(n, "int64") for n in ("b", "s", "l"))

    def i64(x):
        return tirx.IntImm("int64", x)
    q = te.placeholder((b, i64(h), s, i64(d)), name="q")
    k = te.placeholder((b, i64(kv), length, i64(d)), name="k")
    v = te.placeholder((b, i64(kv), length, i64(d)), name="v")
    args = [q, k, v]
    mask = None
    if mask_shape is not None:
        dims = {"b": b, "s": s, "l": length, "1": i64(1)}
        mask = te.placeholder(tuple(dims[c] for c in mask_shape), name="mask")
        args.append(mask)
    out = traced_attention.te_attention(q, k, v, mask, 0.3, softcap)
    func = traced_attention.schedule(te.create_prim_func([*args, out]))
    return tvm.compile(func, target="llvm")


@pytest.mark.parametrize("h,kv,d,mask_shape,softcap", [
    (6, 2, 16, "11sl", 0.0),      # grouped heads, causal-style mask shared by the batch
    (6, 2, 16, "b1sl", 30.0),     # a mask per sequence, soft-capping
    (4, 4, 12, None, 0.0),        # no mask; head dim not a multiple of 8 lanes
])
def test_tir_attention_matches_the_op(h, kv, d, mask_shape, softcap):
    lib = _built(h, kv, d, mask_shape, softcap)
    dev = tvm.cpu()
    for b, s, length in ((1, 1, 1), (1, 1, 37), (2, 5, 9), (1, 16, 16)):
        q, k, v, mask = _inputs(b, h, kv, s, length, d, mask_shape, seed=length)
        want = torch.ops.quipc.attention(q * 4, k, v, mask, 0.3, softcap).numpy()
        arrays = [q * 4, k, v] + ([mask] if mask is not None else [])
        out = tvm.runtime.tensor(np.zeros((b, s, h, d), np.float32), dev)
        lib(*[tvm.runtime.tensor(a.numpy(), dev) for a in arrays], out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
