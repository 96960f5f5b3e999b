"""The token embedding of a build whose embedding shares the quantized lm_head's codes.

A tied model's artifact stores one table: the lm_head's codes, from which the embedding rows
decode (quipc_runtime.embedding.head_rows):

    E[i] = (W'[i] @ K_in) * in_scale

W'[i] decoded from the head's own params (the arrays of its GEMV, the same ones in the params
tuple), per format:
    grid  W'[i, k] = scale[i] * code[i, k] + zero[i]           (planes, scale, zero)
    e8p   W'[i, 8g + c] = sum_s scale[s, i] * E_s(idx_s[i, g])[c]  (the GEMV's codebook tables)
    int8x2 (a trellis head on 8 bits, trellis_as_int8)
          W'[i, k] = scale[0, i] * hi[i, k] + scale[1, i] * lo[i, k] + zero[i]
then multiplied by K_in^T one Kronecker stage at a time (the output side's stage form of the
input factors, a few small matrices: `embed_k{i}`) and by in_scale. The build then holds no
dense fp32 table (113 MB for SmolLM2). Builds of other head formats keep the dense table.
"""
from __future__ import annotations

import numpy as np
from tvm import te

from . import tir_quip_linear as Q


def shares_head(layer) -> bool:
    """Whether the embedding can decode from this head's TVM params (grid, e8p or int8x2)."""
    return layer is not None and layer.format in _ROWS


def embed_params(layer, spec) -> dict[str, np.ndarray]:
    """The K_in^T stage matrices (the head's other arrays are its linear's own params)."""
    mats = Q.factor_matrices(layer.t_in)
    return {f"embed_k{i}": Q.stage_matrix(mats[i], q, True) for i, q in Q._stages(spec.in_orders)}


def embed_param_names(spec) -> list[str]:
    return [f"embed_k{i}" for i, _ in Q._stages(spec.in_orders)]


def te_head_embed(ids, args: dict, spec):
    """x[b, :] = E[ids[b]] (rows, n); args: the head's params by their lowering names plus
    embed_k{i}."""
    rows, n = ids.shape[0], spec.n
    cur = te.compute((rows, n), _ROWS[spec.format](ids, args, spec), name="embed_rows",
                     attrs={"quipc.op": "elementwise"})
    for i, q in Q._stages(spec.in_orders):
        cur = Q._kron_stage(cur, args[f"embed_k{i}"], spec.in_orders[i], q, n, f"embed_k{i}")
    if not spec.in_scale:
        return cur
    s, out = args["in_scale"], cur
    return te.compute((rows, n), lambda b, k: out[b, k] * s[k], name="embed", attrs={"quipc.op": "elementwise"})


def _grid_row(ids, args: dict, spec):
    planes = [args[f"plane{i}"] for i in range(len(Q.PLANES[spec.bits]))]
    scale, zero = args["scale"], args["zero"]

    def row(b, k):
        i = ids[b]
        code = Q._code(planes, spec, i // Q.TILE_O, i % Q.TILE_O, k // Q.K_GROUP, k % Q.K_GROUP)
        return scale[i] * code.astype("float32") + zero[i]
    return row


def _e8p_row(ids, args: dict, spec):
    from . import tir_e8p_linear as E

    kinds = E.stages(spec)
    scale = args["scale"]

    def row(b, k):
        i = ids[b]
        acc = None
        for s, kind in enumerate(kinds):
            a = args[f"idx{s}"][i // E.ROWS, k // E.GROUP, i % E.ROWS].astype("int32")
            term = scale[s, i] * E._entry(kind, args, a, k % E.GROUP)
            acc = term if acc is None else acc + term
        return acc
    return row


def _int8x2_row(ids, args: dict, spec):
    planes = [args["plane0"], args["plane1"]]
    scale, zero = args["scale"], args["zero"]

    def row(b, k):
        i = ids[b]
        hi, lo = (Q._code([p], spec, i // Q.TILE_O, i % Q.TILE_O, k // Q.K_GROUP, k % Q.K_GROUP).astype("float32")
                  for p in planes)
        return scale[0, i] * hi + scale[1, i] * lo + zero[i]
    return row


_ROWS = {"grid": _grid_row, "e8p": _e8p_row, "int8x2": _int8x2_row}
