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
from tvm import te

from . import gemv_i8
from .e8p_as_grid import nibbles
from .tir_quip_linear import (K_GROUP, TILE_O, LinearSpec, _code, dequant_tile_gemm_te, gemv_te, repack_codes,
                              row_sums, te_input_side, te_output_side, transform_names, transform_params,
                              transform_shapes)

SHARED = ()


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
    s = layer.scale.astype(np.float32)                       # (m, 2)
    return two_plane_params(layer, spec, [nibbles(idx, m, n) for idx in split_indices(layer.codes, 4)],
                            s.T * np.float32(0.5), (s[:, 0] + s[:, 1]) * np.float32(-3.75))


def two_plane_params(layer, spec: LinearSpec, planes, scale: np.ndarray, zero: np.ndarray) -> dict[str, np.ndarray]:
    """The parameters of a two-plane layer: planes (two (m, n) nibble arrays), scale (2, m),
    zero (m,), padded to the kernel's tiles, and the layer's transforms."""
    out = {f"plane{s}": repack_codes(np.asarray(q, np.uint32), 4)[0] for s, q in enumerate(planes)}
    pad = spec.o_pad - layer.out_features
    out["scale"] = np.pad(np.asarray(scale, np.float32), ((0, 0), (0, pad)))
    out["zero"] = np.pad(np.asarray(zero, np.float32), (0, pad))
    out.update(transform_params(layer, spec))
    return out


def quip_linear_te(x, args: dict, spec: LinearSpec, mode: str, residual=None):
    rows = x.shape[0]
    scale, zero = args["scale"], args["zero"]
    n_ot = spec.o_pad // TILE_O
    planes = [args["plane0"], args["plane1"]]
    z = te_input_side(x, args, spec, spec.k_pad)
    if mode == "gemv" and spec.int8_acts:
        acc, zsum_at = gemv_i8.gemv_te(z, planes, spec, rows, "quip_gemv_i8")

        def t_at(b, o):
            return zero[o] * zsum_at(b) + scale[0, o] * acc(0, b, o) + scale[1, o] * acc(1, b, o)
    elif mode == "gemv":
        zsum = row_sums(z, rows, spec.n)
        # the grid GEMV once per stage, each on one 4-bit plane
        accs = [gemv_te(z, [plane], spec, rows, f"quip_gemv{s}")
                for s, plane in enumerate(planes)]

        def t_at(b, o):
            return zero[o] * zsum[b] + scale[0, o] * accs[0](b, o) + scale[1, o] * accs[1](b, o)
    else:
        def wval(ot, k, oi):
            o = ot * TILE_O + oi
            qa, qb = (_code([p], spec, ot, oi, k // K_GROUP, k % K_GROUP).astype("float32") for p in planes)
            return scale[0, o] * qa + scale[1, o] * qb + zero[o]
        # the e8p prefill's stage names, so that its schedule rule (schedules/e8p.py) takes it
        t_at = dequant_tile_gemm_te(wval, z, rows, n_ot, spec.k_pad, TILE_O, "e8p")
    return te_output_side(t_at, rows, args, spec, residual)
