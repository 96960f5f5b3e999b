"""quipc/memory.py: a block's linear weights kept in the 16-bit type that holds them exactly."""
from __future__ import annotations

import gc
import warnings

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
        assert set(narrowed) == {first, second} and len(narrowed) == 2
        first.weight.data = new
    assert first.weight.data_ptr() == new.data_ptr()
    assert second.weight.dtype == torch.float32


def test_disabled_keeps_every_weight():
    block = _block(torch.float16)
    with compact_linear_weights(block, enabled=False) as narrowed:
        assert len(narrowed) == 0 and first_linear(block) not in narrowed
        assert all(m.weight.dtype == torch.float32 for m in block if isinstance(m, nn.Linear))


def test_replace_frees_the_narrow_original_at_once():
    block = _block(torch.float16)
    first, second = block[0], block[2]
    x = torch.randn(3, 16)
    new = torch.randn_like(first.weight, dtype=torch.float32)
    with compact_linear_weights(block) as narrowed:
        original = first.weight.data_ptr()
        assert _held_tensors(original)
        narrowed.replace(first, new)
        assert not _held_tensors(original)              # nothing holds the float16 tensor any more
        assert first not in narrowed and second in narrowed
        assert not first._forward_hooks and not first._forward_pre_hooks
        with torch.no_grad():
            block(x)                                    # no hook puts the original back
        assert first.weight.data_ptr() == new.data_ptr()
    assert first.weight.data_ptr() == new.data_ptr()
    assert second.weight.dtype == torch.float32


def _held_tensors(ptr: int) -> list:
    gc.collect()
    with warnings.catch_warnings():     # isinstance on some torch.distributed objects warns
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype == torch.float16
                and o.data_ptr() == ptr]


def first_linear(block):
    return next(m for m in block if isinstance(m, nn.Linear))


def test_drop_frees_the_original_and_leaves_an_empty_weight():
    block = _block(torch.float16)
    first, second = block[0], block[2]
    with compact_linear_weights(block) as narrowed:
        original = first.weight.data_ptr()
        narrowed.drop(first)
        assert not _held_tensors(original)
        assert first.weight.numel() == 0 and first.weight.dtype == torch.float32 and first not in narrowed
        narrowed.drop(first)                            # not held any more: left alone
        new = torch.randn(32, 16)
        narrowed.replace(first, new)                    # installed afterwards
    assert first.weight.data_ptr() == new.data_ptr()
    assert second.weight.dtype == torch.float32


def test_a_narrow_checkpoint_rounds_alike_with_its_weights_dropped_as_rounded(tmp_path, monkeypatch):
    """quantize_model on a model whose weights float16 holds: held narrow, each dropped once
    its linear is rounded (NarrowedWeights.drop), the same layers as with float32 weights."""
    from transformers import AutoModelForCausalLM

    from quipc.config import QuantConfig
    from quipc.memory import NarrowedWeights
    from quipc.passes import sequential
    from tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m")

    def model():
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
        return m

    windows = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=2, seed=3)

    def run():
        layers = {}
        sequential.quantize_model(model(), windows, cfg, batch=2,
                                  on_block=lambda i, ls: layers.update({l.name: l.checksum() for l in ls}))
        return layers

    dropped = []
    real_drop = NarrowedWeights.drop
    monkeypatch.setattr(NarrowedWeights, "drop", lambda self, mod: (dropped.append(mod in self), real_drop(self, mod)))
    narrow = run()
    assert len(dropped) == 14 and all(dropped)              # 7 linears x 2 blocks, each held narrow until rounded
    monkeypatch.setattr(sequential, "compact_linear_weights",
                        lambda block, enabled=True: compact_linear_weights(block, enabled=False))
    assert run() == narrow
