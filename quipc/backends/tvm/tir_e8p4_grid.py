"""A 4-bit "e8p" layer (two E8P stages) as two 4-bit grid stages: TIR lowering of the TVM-only
format "grid4x2" (e8p_as_grid.as_grid4x2 relabels a layer; its codes stay the artifact's).

Every E8P coordinate is q/2 - 15/4 with q a nibble (e8p_as_grid), so
    W'[i, j] = s0[i] E8P[a][j] + s1[i] E8P[b][j] = (s0/2) qa + (s1/2) qb - 15/4 (s0 + s1)
and the layer is computed as
    gemv (decode):  acc_s = q_s . z (the grid GEMV of tir_quip_linear, once per stage), then
                    t = (s0/2) acc_a + (s1/2) acc_b + zero * sum(z)
    gemm (prefill): one 16-row tile of W' at a time (both stages, scales and zero applied) times
                    z, as the e8p lowering's prefill (and scheduled by its rule)
Parameters: plane0 / plane1 (each stage's nibbles in the grid's 4-bit plane layout), scale
(2, o_pad) = (s0/2, s1/2), zero (o_pad,) = -15/4 (s0 + s1), then the transforms' arrays.
"""
from __future__ import annotations

import numpy as np
from quipc_runtime.formats.e8p import split_indices
from quipc_runtime.formats.lattice import e8p_table
from tvm import te

from .tir_quip_linear import (K_GROUP, PARTS, TILE_O, LinearSpec, _code, dequant_tile_gemm_te, repack_codes,
                              te_input_side, te_output_side, transform_names, transform_params,
                              transform_shapes)

SHARED = ()
_NIBBLES = LinearSpec(m=1, n=1, bits=4)   # _code reads one 4-bit plane


def param_names(spec: LinearSpec) -> list[str]:
    return ["plane0", "plane1", "scale", "zero"] + transform_names(spec)


def param_shapes(spec: LinearSpec) -> dict[str, tuple]:
    plane = (spec.o_pad // TILE_O, spec.k_pad // 8, TILE_O)
    return {"plane0": plane, "plane1": plane, "scale": (2, spec.o_pad), "zero": (spec.o_pad,),
            **transform_shapes(spec)}


def placeholders(spec: LinearSpec, prefix: str = "") -> dict:
    return {k: te.placeholder(shape, "int32" if k.startswith("plane") else "float32", name=prefix + k)
            for k, shape in param_shapes(spec).items()}


def linear_params(layer, spec: LinearSpec | None = None) -> dict[str, np.ndarray]:
    spec = spec or LinearSpec.of(layer)
    if spec.format != "grid4x2" or layer.bits != 4:
        raise ValueError(f"layer {layer.name}: the grid4x2 lowering takes a 4-bit e8p layer "
                         "relabelled by e8p_as_grid.as_grid4x2")
    m, n = layer.out_features, layer.in_features
    out = {}
    for s, idx in enumerate(split_indices(layer.codes, 4)):
        q = (e8p_table()[idx].reshape(m, n) * np.float32(2) + np.float32(7.5)).astype(np.uint32)
        (out[f"plane{s}"],) = repack_codes(q, 4)
    s = layer.scale.astype(np.float32)                       # (m, 2)
    pad = spec.o_pad - m
    out["scale"] = np.pad(s.T * np.float32(0.5), ((0, 0), (0, pad)))
    out["zero"] = np.pad((s[:, 0] + s[:, 1]) * np.float32(-3.75), (0, pad))
    out.update(transform_params(layer, spec))
    return out


def _stage_gemv(z, plane, rows, n_ot: int, n_kw: int, name: str):
    """part[b, ot, q, oi]: one stage's grid GEMV (schedules/quip_gemv.py takes it)."""
    kw = te.reduce_axis((0, n_kw), name="kw")
    kj = te.reduce_axis((0, K_GROUP // PARTS), name="kj")
    return te.compute(
        (rows, n_ot, PARTS, TILE_O),
        lambda b, ot, q, oi: te.sum(_code([plane], _NIBBLES, ot, oi, kw, kj * PARTS + q).astype("float32")
                                    * z[b, kw * K_GROUP + kj * PARTS + q], axis=[kw, kj]),
        name=name, attrs={"quipc.op": "quip_gemv"})


def quip_linear_te(x, args: dict, spec: LinearSpec, mode: str, residual=None):
    rows = x.shape[0]
    scale, zero = args["scale"], args["zero"]
    n_ot, n_kw = spec.o_pad // TILE_O, spec.k_pad // K_GROUP
    planes = [args["plane0"], args["plane1"]]
    z = te_input_side(x, args, spec, spec.k_pad)
    if mode == "gemv":
        kz = te.reduce_axis((0, spec.n), name="kz")
        zsum = te.compute((rows,), lambda b: te.sum(z[b, kz], axis=kz), name="quip_zsum",
                          attrs={"quipc.op": "rowsum"})
        parts = [_stage_gemv(z, plane, rows, n_ot, n_kw, f"quip_gemv{s}") for s, plane in enumerate(planes)]

        def t_at(b, o):
            ot, oi = o // TILE_O, o % TILE_O
            tot = zero[o] * zsum[b]
            for s, part in enumerate(parts):
                acc = part[b, ot, 0, oi]
                for q in range(1, PARTS):
                    acc = acc + part[b, ot, q, oi]
                tot = tot + scale[s, o] * acc
            return tot
    else:
        def wval(ot, k, oi):
            o = ot * TILE_O + oi
            qa, qb = (_code([p], _NIBBLES, ot, oi, k // K_GROUP, k % K_GROUP).astype("float32") for p in planes)
            return scale[0, o] * qa + scale[1, o] * qb + zero[o]
        # the e8p prefill's stage names, so that its schedule rule (schedules/e8p.py) takes it
        t_at = dequant_tile_gemm_te(wval, z, rows, n_ot, spec.k_pad, TILE_O, "e8p")
    return te_output_side(t_at, rows, args, spec, residual)
