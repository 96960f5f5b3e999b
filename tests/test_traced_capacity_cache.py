"""The capacity cache of the traced capture (backends/traced/capture.py, `cache="capacity"`) on
the torch side: torch.ops.quipc.kv_write's meaning, and the captured program computing what
the model computes with its own cache (the TVM lowering is tested in test_traced_tvm.py)."""
from __future__ import annotations

import pytest
import torch

from quipc_runtime import torch_ops  # noqa: F401  (registers torch.ops.quipc.*)
from traced_families import family_artifact


def test_kv_write_is_the_cache_head_then_the_new_positions():
    g = torch.Generator().manual_seed(0)
    cache, new = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 2, 4, generator=g)
    out = torch.ops.quipc.kv_write(cache, new, torch.zeros(7, dtype=torch.long))
    assert out.shape == (2, 3, 7, 4)
    assert torch.equal(out[:, :, :5], cache[:, :, :5]) and torch.equal(out[:, :, 5:], new)
    with pytest.raises(ValueError, match="do not fit a cache of 10"):
        torch.ops.quipc.kv_write(cache, new, torch.zeros(11, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.quipc.kv_write(cache, new, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("family,row_multiple", [("llama", 1), ("gemma2", 1), ("llama", 16)])
def test_capacity_capture_matches_the_model(family, row_multiple):
    """Prefill of the example's rows after 3 cached ones, the cache's tail garbage: the
    program's logits and present equal the model's own forward with a DynamicCache of the 3.
    row_multiple 16: ids as (batch, tiles, 16), and the logits of the row `last` only."""
    from transformers import DynamicCache

    from quipc.backends.traced import Traceable

    tr = Traceable.load(family_artifact(family), attention="op")
    last_only = row_multiple > 1
    captured = tr.capture(cache="capacity", row_multiple=row_multiple, last_only=last_only)
    ids, span, caches, *last = captured.example
    if row_multiple > 1:
        assert ids.shape[2] == row_multiple
        ids = ids.reshape(ids.shape[0], -1)
    past = span.shape[0] - ids.shape[1]
    assert past > 0 and caches[0].shape[2] > span.shape[0]
    logits, present = captured.program.module()(*captured.example)

    cache = DynamicCache()
    for i in range(tr.layout.layers):
        cache.update(caches[2 * i][:, :, :past], caches[2 * i + 1][:, :, :past], i)
    pos = torch.arange(past, span.shape[0])
    with torch.no_grad():
        want = tr.model(input_ids=ids, position_ids=pos[None].expand(ids.shape[0], -1), cache_position=pos,
                        past_key_values=cache, use_cache=True)
    torch.testing.assert_close(logits, want.logits[:, last[0]] if last else want.logits, rtol=1e-5, atol=1e-5)
    for i in range(tr.layout.layers):
        torch.testing.assert_close(present[2 * i], cache.layers[i].keys)
        torch.testing.assert_close(present[2 * i + 1], cache.layers[i].values)
    writes = [n for n in captured.program.graph.nodes if n.target is torch.ops.quipc.kv_write.default]
    assert len(writes) == 2 * tr.layout.layers
