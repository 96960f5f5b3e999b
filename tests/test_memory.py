"""quipc/memory.py: a block's linear weights kept in the 16-bit type that holds them exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quipc.memory import compact_linear_weights


def _block(narrow: torch.dtype | None) -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False), nn.LayerNorm(8))
    if narrow is not None:
        with torch.no_grad():
            for mod in block:
                if isinstance(mod, nn.Linear):
                    # bfloat16's values of a weight beyond float16's range (float16 holds small ones too)
                    big = 1e6 if narrow == torch.bfloat16 else 1.0
                    mod.weight.copy_((mod.weight * big).to(narrow).float())
    return block


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
def test_weights_held_narrow_compute_as_before(narrow):
    block = _block(narrow)
    x = torch.randn(3, 16)
    before = [m.weight.detach().clone() for m in block if isinstance(m, nn.Linear)]
    ref = block(x)
    with compact_linear_weights(block):
        linears = [m for m in block if isinstance(m, nn.Linear)]
        assert all(m.weight.dtype == narrow for m in linears)
        with torch.no_grad():
            assert torch.equal(block(x), ref)
        assert all(m.weight.dtype == narrow for m in linears)     # the upcast dropped after the call
        assert all(torch.equal(m.weight.data.float(), w) for m, w in zip(linears, before))
    assert all(m.weight.dtype == torch.float32 and torch.equal(m.weight, w) for m, w in zip(linears, before))
    assert torch.equal(block(x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in block)


def test_weights_no_narrow_type_holds_stay_float32():
    block = _block(None)     # random float32 values: neither float16 nor bfloat16 holds them
    with compact_linear_weights(block):
        assert all(m.weight.dtype == torch.float32 for m in block if isinstance(m, nn.Linear))


def test_an_error_inside_restores_the_weights():
    block = _block(torch.float16)
    with pytest.raises(RuntimeError, match="inside"):
        with compact_linear_weights(block):
            raise RuntimeError("inside")
    assert all(m.weight.dtype == torch.float32 for m in block if isinstance(m, nn.Linear))


def test_a_weight_replaced_inside_stays_replaced():
    block = _block(torch.float16)
    first, second = block[0], block[2]
    new = torch.randn_like(first.weight, dtype=torch.float32)
    with compact_linear_weights(block) as narrowed:
        assert narrowed == {first, second}
        first.weight.data = new
    assert first.weight.data_ptr() == new.data_ptr()
    assert second.weight.dtype == torch.float32


def test_disabled_keeps_every_weight():
    block = _block(torch.float16)
    with compact_linear_weights(block, enabled=False) as narrowed:
        assert narrowed == set()
        assert all(m.weight.dtype == torch.float32 for m in block if isinstance(m, nn.Linear))
