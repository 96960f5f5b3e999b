"""A layer's rows kept at 8 bits (quipc_runtime.layer's row patch) in TVM.

Two TE stages after the layer's own kernel:
- patch (L, K_pad/16, 16) = x @ rows^T, the int8 rows stored tiled like the dense lm_head
  ((K_pad/16, n, 16), zero rows to a multiple of 16) and cast in the reduction: the
  register-tiled "tiled_gemm" schedule, one int8 read of each row per token;
- merge (L, m): y[b, v], or scale[s] * patch[b, s] where slot[v] = s >= 0 names v's patched
  row (slot: -1 elsewhere, one int32 per output row): an elementwise pass over the logits.
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx

LANES = 16


def params(layer, name: str) -> dict[str, np.ndarray]:
    """The arrays the two stages read, by parameter name."""
    k, n = layer.row_values.shape
    k_pad = -(-k // LANES) * LANES
    vals = np.zeros((k_pad, n), np.int8)
    vals[:k] = layer.row_values
    tiles = np.ascontiguousarray(vals.reshape(k_pad // LANES, LANES, n).transpose(0, 2, 1))
    slot = np.full(layer.out_features, -1, np.int32)
    slot[layer.row_ids.astype(np.int64)] = np.arange(k, dtype=np.int32)
    return {f"{name}.row_tiles": tiles, f"{name}.row_scale": layer.row_scale.astype(np.float32),
            f"{name}.row_slot": slot}


def te_patch(x, tiles):
    """(L, K_pad/16, 16) = x @ rows^T with rows int8, tiled (K_pad/16, n, 16)."""
    k = te.reduce_axis((0, tiles.shape[1]), name="k")
    return te.compute((x.shape[0], tiles.shape[0], LANES),
                      lambda b, t, l: te.sum(x[b, k] * tiles[t, k, l].astype("float32"), axis=k),
                      name="row_patch", attrs={"quipc.op": "tiled_gemm", "quipc.axes": "mtl",
                                               "quipc.order": "t_outer"})


def te_merge(y, patch, scale, slot):
    """y with its patched rows' values taken from `patch` (scaled)."""
    def val(b, v):
        s = slot[v]
        safe = tirx.max(s, 0)
        return tirx.Select(s >= 0, patch[b, safe // LANES, safe % LANES] * scale[safe], y[b, v])
    return te.compute(y.shape, val, name="row_merge", attrs={"quipc.op": "elementwise"})


def emit(bb, x, y, tiles, scale, slot, prefix: str = ""):
    """Relax: the 2-D output y (L, m) of a layer with its patched rows recomputed from 2-D x;
    prefix: of the PrimFuncs' names (functions built apart and merged into one module)."""
    patch = bb.emit_te(te_patch, x, tiles, primfunc_name_hint=f"{prefix}row_patch")
    return bb.emit_te(te_merge, y, patch, scale, slot, primfunc_name_hint=f"{prefix}row_merge")
