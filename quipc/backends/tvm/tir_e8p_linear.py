"""The "e8p" code format as a TE/TIR computation: codebook lookup fused into the matmul.

W'[i, 8g:8g+8] = scale[i, 0] * E8P[a] (+ scale[i, 1] * T2[b]), a, b the group's stage indices
(quipc_runtime.formats.e8p). E8P[a] is decoded in the loop from small tables that stay in L1
(shared by every layer, stored once per model):
    e8p_src      (256, 8) float32  the source vectors, coordinate 7 already negated where the
                                   source's coordinate sum is odd (so the implied sign needs
                                   only the 7 sign bits)
    e8p_signbits (256, 8) uint32   for the high byte h = a >> 8: the float sign bit (0x80000000)
                                   of each negated coordinate (bits 0-6 of h, coordinate 7
                                   their parity)
    e8_1bit      (256, 8) float32  the one-bit E8 stage (3 bits)
    E8P[a][c] = (e8p_src[a & 255, c] XOR e8p_signbits[a >> 8, c]) + shift(a),
    shift(a) = -1/4 if bit 15 of a is set, else +1/4 (the same for the 8 coordinates)
Per stage s the kernel computes

    gemv (decode):  part_s[b, o, c] = sum_g (src XOR signbits)(idx_s[o, g])[c] * z[b, 8g + c]
                    shift_s[b, o]   = sum_g shift(idx_s[o, g]) * zsum[b, g]   (zsum: the group's
                                      sum of z; 16 rows at once, one vector lane per row)
                    t[b, o] = sum_s scale[s, o] * (sum_c part_s[b, o, c] + shift_s[b, o])
                    so a weight costs one FMA: the sign is a bit flip, the shift a term per row
    gemm (prefill): wdq[ot, k, oi] = sum_s scale[s, o] E_s(idx_s[o, k / 8])[k % 8], one 16-row
                    tile at a time (never the whole matrix), then acc = wdq . z (tiled_gemm)

z = K_in (in_scale * x) and the output side (K_out, signs, bias, residual) are shared with the
grid lowering (tir_quip_linear). Index layout, repacked at compile time (same bytes per group):
idx_s[o // ROWS, g, o % ROWS] (uint16 for an E8P stage, uint8 for the one-bit stage), rows
zero-padded to a multiple of TILE_O: ROWS rows of one group are adjacent, so the decode GEMV
streams the codes of its ROWS-row tile linearly.
"""
from __future__ import annotations

import numpy as np
from quipc_runtime.formats import e8p as fmt
from quipc_runtime.formats.lattice import GROUP, e8_one_bit_table, e8p_source_parity, e8p_sources
from tvm import te, tirx

from .tir_quip_linear import (LinearSpec, _ceil_to, dequant_tile_gemm_te, te_input_side,
                              te_output_side, transform_names, transform_params, transform_shapes)

ROWS = 16     # rows of one GEMV tile: 16 independent 8-lane accumulators (AVX-512 has 32 registers)
TILE_O = 16   # rows of one prefill dequantized tile (the tiled_gemm lane width)
SHARED = ("e8p_src", "e8p_signbits", "e8_1bit")
_DTYPE = {"e8p": "uint16", "e8_1bit": "uint8"}


def o_pad(spec: LinearSpec) -> int:
    return _ceil_to(spec.m, TILE_O)


def stages(spec: LinearSpec) -> tuple[str, ...]:
    return fmt.STAGES[spec.bits]


def e8p_tables() -> dict[str, np.ndarray]:
    """The codebook tables (see the module docstring)."""
    src = e8p_sources().copy()
    src[:, 7] *= np.where(e8p_source_parity() == 1, -1.0, 1.0).astype(np.float32)
    hi = np.arange(256)
    bits = (hi[:, None] >> np.arange(7)[None, :]) & 1                         # (256, 7)
    neg = np.concatenate([bits, (bits.sum(1) & 1)[:, None]], axis=1)
    return {"e8p_src": np.ascontiguousarray(src, np.float32),
            "e8p_signbits": (neg.astype(np.uint32) << np.uint32(31)).astype(np.uint32),
            "e8_1bit": np.ascontiguousarray(e8_one_bit_table(), np.float32)}


def _tables_for(spec: LinearSpec) -> list[str]:
    kinds = stages(spec)
    return (["e8p_src", "e8p_signbits"] if "e8p" in kinds else []) + (["e8_1bit"] if "e8_1bit" in kinds else [])


def repack_indices(idx: np.ndarray, rows_pad: int, dtype: str) -> np.ndarray:
    """(m, G) stage indices -> (rows_pad / ROWS, G, ROWS), zero rows appended."""
    m, g = idx.shape
    full = np.zeros((rows_pad, g), dtype)
    full[:m] = idx
    return np.ascontiguousarray(full.reshape(rows_pad // ROWS, ROWS, g).transpose(0, 2, 1))


def param_names(spec: LinearSpec) -> list[str]:
    return ([f"idx{s}" for s in range(len(stages(spec)))] + ["scale"] + _tables_for(spec)
            + transform_names(spec))


def param_shapes(spec: LinearSpec) -> dict[str, tuple]:
    op, groups = o_pad(spec), spec.n // GROUP
    shapes = {f"idx{s}": (op // ROWS, groups, ROWS) for s in range(len(stages(spec)))}
    shapes["scale"] = (len(stages(spec)), op)
    tables = {"e8p_src": (256, GROUP), "e8p_signbits": (256, GROUP), "e8_1bit": (256, GROUP)}
    shapes.update({k: tables[k] for k in _tables_for(spec)})
    return {**shapes, **transform_shapes(spec)}


def _dtypes(spec: LinearSpec) -> dict[str, str]:
    return {**{f"idx{s}": _DTYPE[kind] for s, kind in enumerate(stages(spec))}, "e8p_signbits": "uint32"}


def placeholders(spec: LinearSpec, prefix: str = "") -> dict:
    dtypes = _dtypes(spec)
    return {k: te.placeholder(shape, dtypes.get(k, "float32"), name=prefix + k)
            for k, shape in param_shapes(spec).items()}


def linear_params(layer, spec: LinearSpec | None = None) -> dict[str, np.ndarray]:
    """The arrays the kernel takes (names of `param_names(spec)`); SHARED ones included."""
    spec = spec or LinearSpec.of(layer)
    if spec.format != "e8p":
        raise ValueError(f"layer {layer.name} is stored as {spec.format!r}, not 'e8p'")
    fmt.E8P.check(spec.bits, spec.n)
    op = o_pad(spec)
    out = {}
    dtypes = _dtypes(spec)
    for s, idx in enumerate(fmt.split_indices(layer.codes, spec.bits)):
        out[f"idx{s}"] = repack_indices(idx, op, dtypes[f"idx{s}"])
    scale = np.zeros((len(stages(spec)), op), np.float32)
    scale[:, :spec.m] = layer.scale.astype(np.float32).reshape(spec.m, -1).T
    out["scale"] = scale
    tables = e8p_tables()
    out.update({k: tables[k] for k in _tables_for(spec)})
    out.update(transform_params(layer, spec))
    return out


def _signed_source(args: dict, a, c):
    """Coordinate c of E8P[a] without its shift: the source coordinate, its sign bit flipped."""
    bits = tirx.reinterpret("uint32", args["e8p_src"][a & 255, c]) ^ args["e8p_signbits"][a >> 8, c]
    return tirx.reinterpret("float32", bits)


def _shift(a, value):
    """shift(a) * value: -value where bit 15 of the E8P index a is set, else value."""
    return tirx.Select(a >= 32768, -value, value)


def _entry(kind: str, args: dict, a, c):
    """Coordinate c of the stage-table entry of index a (int32)."""
    if kind == "e8_1bit":
        return args["e8_1bit"][a, c]
    return _signed_source(args, a, c) + _shift(a, tirx.const(0.25, "float32"))


def _gemv_stage(z, idx, kind: str, args: dict, rows, op: int, name: str):
    g = te.reduce_axis((0, z.shape[1] // GROUP), name="g")
    entry = (lambda a, c: args["e8_1bit"][a, c]) if kind == "e8_1bit" else \
        (lambda a, c: _signed_source(args, a, c))

    def body(b, ot, r, c):
        a = idx[ot, g, r].astype("int32")
        return te.sum(entry(a, c) * z[b, g * GROUP + c], axis=g)
    return te.compute((rows, op // ROWS, ROWS, GROUP), body, name=name, attrs={"quipc.op": "e8p_gemv"})


def _shift_stage(zsum, idx, rows, op: int, name: str):
    g = te.reduce_axis((0, zsum.shape[1]), name="g")
    return te.compute((rows, op // ROWS, ROWS),
                      lambda b, ot, r: te.sum(_shift(idx[ot, g, r].astype("int32"), zsum[b, g]), axis=g),
                      name=name, attrs={"quipc.op": "e8p_shift"})


def _group_sums(z, rows):
    """zsum[b, g] = sum of the group's 8 inputs / 4 (the E8P shift's magnitude folded in)."""
    c = te.reduce_axis((0, GROUP), name="c")
    return te.compute((rows, z.shape[1] // GROUP),
                      lambda b, g: te.sum(z[b, g * GROUP + c] * tirx.const(0.25, "float32"), axis=c),
                      name="e8p_zsum", attrs={"quipc.op": "e8p_zsum"})


def quip_linear_te(x, args: dict, spec: LinearSpec, mode: str, residual=None):
    """Build the TE graph. x: (L, n) float32; args: name -> te placeholder (see param_names).
    mode "gemv" (decode, L small) or "gemm" (prefill, L a multiple of 16). Returns y (L, m)."""
    rows = x.shape[0]
    n, op = spec.n, o_pad(spec)
    kinds = stages(spec)
    z = te_input_side(x, args, spec, n)
    scale = args["scale"]
    idx = [args[f"idx{s}"] for s in range(len(kinds))]
    if mode == "gemv":
        parts = [_gemv_stage(z, idx[s], kind, args, rows, op, f"e8p_gemv{s}") for s, kind in enumerate(kinds)]
        zsum = _group_sums(z, rows) if "e8p" in kinds else None
        shifts = [_shift_stage(zsum, idx[s], rows, op, f"e8p_shift{s}") if kind == "e8p" else None
                  for s, kind in enumerate(kinds)]

        def rowsum(b, ot, r):
            tot = None
            for s, part in enumerate(parts):
                acc = part[b, ot, r, 0]
                for c in range(1, GROUP):
                    acc = acc + part[b, ot, r, c]
                if shifts[s] is not None:
                    acc = acc + shifts[s][b, ot, r]
                term = scale[s, ot * ROWS + r] * acc
                tot = term if tot is None else tot + term
            return tot
        # its own block: the schedule puts it (and every stage) in the GEMV's parallel tile loop
        t = te.compute((rows, op // ROWS, ROWS), rowsum, name="e8p_rowsum", attrs={"quipc.op": "e8p_rowsum"})

        def t_at(b, o):
            return t[b, o // ROWS, o % ROWS]
    else:
        def wval(ot, k, oi):
            o = ot * TILE_O + oi
            tot = None
            for s, kind in enumerate(kinds):
                a = idx[s][o // ROWS, k // GROUP, o % ROWS].astype("int32")
                term = scale[s, o] * _entry(kind, args, a, k % GROUP)
                tot = term if tot is None else tot + term
            return tot
        t_at = dequant_tile_gemm_te(wval, z, rows, op // TILE_O, n, TILE_O, "e8p")
    return te_output_side(t_at, rows, args, spec, residual)
