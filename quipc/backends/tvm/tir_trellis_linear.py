"""The "trellis" code format as a TE/TIR computation: states and code lookup fused into the matmul.

W'[o, 16 C + c] = scale[o] * CODE[s], s the 12-bit window at bit k c of row o's 2k bytes of
column tile C followed by the first 2 bytes of the tile's next row (row 0 after row 15;
quipc_runtime.formats.trellis): the three bytes from byte (k c) / 8 make a 24-bit word, shifted
right by 12 - (k c) % 8 and masked. CODE (4096 floats, shared by every layer, stored once per
model) stays in L1. The codes are the artifact's bytes as they are.

    gemv (decode):  part[b, o, c] = sum_C CODE[s(o, 16 C + c)] * z[b, 16 C + c]  (16 lanes = c)
                    t[b, o] = scale[o] * sum_c part[b, o, c]
    gemm (prefill): wdq[ot, k, oi] = scale[o] CODE[s(o, k)] one 16-row tile at a time, then
                    acc = wdq . z (tiled_gemm)
z = K_in (in_scale * x) and the output side are shared with the grid lowering (tir_quip_linear).
"""
from __future__ import annotations

import numpy as np
from quipc_runtime.formats import get_format
from quipc_runtime.formats import trellis as fmt
from tvm import te, tirx

from .tir_quip_linear import (LinearSpec, dequant_tile_gemm_te, te_input_side, te_output_side, transform_names,
                              transform_params, transform_shapes)

TILE = fmt.TILE
SHARED = ("trellis_code",)


def param_names(spec: LinearSpec) -> list[str]:
    return ["codes", "scale", "trellis_code"] + transform_names(spec)


def param_shapes(spec: LinearSpec) -> dict[str, tuple]:
    shapes = {"codes": (spec.m, spec.n * spec.bits // 8), "scale": (spec.m,),
              "trellis_code": (1 << fmt.STATE_BITS,)}
    return {**shapes, **transform_shapes(spec)}


def placeholders(spec: LinearSpec, prefix: str = "") -> dict:
    return {k: te.placeholder(shape, "uint8" if k == "codes" else "float32", name=prefix + k)
            for k, shape in param_shapes(spec).items()}


def linear_params(layer, spec: LinearSpec | None = None) -> dict[str, np.ndarray]:
    """The arrays the kernel takes (names of `param_names(spec)`); SHARED ones included."""
    spec = spec or LinearSpec.of(layer)
    if spec.format not in fmt.FORMAT_NAMES:
        raise ValueError(f"layer {layer.name} is stored as {spec.format!r}, not a trellis format {fmt.FORMAT_NAMES}")
    get_format(spec.format).check(spec.bits, spec.n, spec.m)
    out = {"codes": np.ascontiguousarray(layer.codes),
           "scale": np.ascontiguousarray(layer.scale.astype(np.float32).reshape(spec.m)),
           "trellis_code": np.array(fmt.code_table(spec.format))}
    out.update(transform_params(layer, spec))
    return out


def _next_row(o):
    """The tile's next row after row o (row 0 after row 15), whose first 2 bytes a row spills into."""
    return (o // TILE) * TILE + (o + 1) % TILE   # (o - o % TILE + ...: a TVM simplifier divides by 0)


def _value(args: dict, k: int, o, tile, c):
    """CODE[state] of W'[o, 16 tile + c] (unscaled)."""
    codes = args["codes"]
    bit = c * k
    first = bit // 8
    nxt = _next_row(o)

    def byte(d):
        q = first + d
        own = codes[o, tile * 2 * k + tirx.min(q, 2 * k - 1)]
        spill = codes[nxt, tile * 2 * k + tirx.max(q - 2 * k, 0)]
        return tirx.if_then_else(q < 2 * k, own, spill).astype("int32")

    word = (byte(0) << 16) | (byte(1) << 8) | byte(2)
    state = (word >> (24 - fmt.STATE_BITS - bit % 8)) & ((1 << fmt.STATE_BITS) - 1)
    return args["trellis_code"][state]


def _words(args: dict, k: int, m: int, tiles: int):
    """The bytes a tile row reads, big-endian in 64-bit words (the GEMV's per-row stage):
    word0[o, C] = its 2k bytes then the next row's 2 (k = 2, 3: all of them, zero filled; k = 4:
    the first 8), word1 = word0 << 16 | the 2 spill bytes (k = 4 only: weights 14 and 15)."""
    codes = args["codes"]

    def word0(o, tile):
        nxt = _next_row(o)
        seq = [codes[o, tile * 2 * k + q] for q in range(2 * k)]
        seq += [codes[nxt, tile * 2 * k + q] for q in range(2)]
        acc = tirx.const(0, "uint64")
        for j, byte in enumerate(seq[:8]):
            acc = acc | (byte.astype("uint64") << tirx.const(56 - 8 * j, "uint64"))
        return acc

    w0 = te.compute((m, tiles), word0, name="trellis_word0", attrs={"quipc.op": "trellis_word"})
    if k < 4:
        return w0, None

    def word1(o, tile):
        nxt = _next_row(o)
        spill = (codes[nxt, tile * 2 * k].astype("uint64") << tirx.const(8, "uint64")) | \
            codes[nxt, tile * 2 * k + 1].astype("uint64")
        return (w0[o, tile] << tirx.const(16, "uint64")) | spill

    return w0, te.compute((m, tiles), word1, name="trellis_word1", attrs={"quipc.op": "trellis_word"})


def _value_from_words(args: dict, k: int, w0, w1, o, tile, c):
    """CODE[state] of W'[o, 16 tile + c] from the tile row's words: the 12 bits at bit k c."""
    # shifted left (positive lane strides: a vectorized ramp of shift counts stays unsigned)
    drop = tirx.const(64 - fmt.STATE_BITS, "uint64")
    state = (w0[o, tile] << (k * c).astype("uint64")) >> drop
    if w1 is not None:   # k = 4: weights 14, 15 end past bit 64 of word0; word1 starts at bit 16
        late = (w1[o, tile] << ((k * c + 48) % 64).astype("uint64")) >> drop
        state = tirx.if_then_else(k * c + fmt.STATE_BITS <= 64, state, late)
    return args["trellis_code"][state.astype("int32")]


def quip_linear_te(x, args: dict, spec: LinearSpec, mode: str, residual=None):
    """Build the TE graph. x: (L, n) float32; args: name -> te placeholder (see param_names).
    mode "gemv" (decode, L small) or "gemm" (prefill, L a multiple of 16). Returns y (L, m)."""
    rows = x.shape[0]
    n, m, k = spec.n, spec.m, spec.bits
    z = te_input_side(x, args, spec, n)
    scale = args["scale"]
    if mode == "gemv":
        g = te.reduce_axis((0, n // TILE), name="g")
        w0, w1 = _words(args, k, m, n // TILE)
        part = te.compute((rows, m, TILE),
                          lambda b, o, c: te.sum(_value_from_words(args, k, w0, w1, o, g, c)
                                                 * z[b, g * TILE + c], axis=g),
                          name="trellis_gemv", attrs={"quipc.op": "trellis_gemv"})

        def rowsum(b, o):
            acc = part[b, o, 0]
            for c in range(1, TILE):
                acc = acc + part[b, o, c]
            return scale[o] * acc
        t = te.compute((rows, m), rowsum, name="trellis_rowsum", attrs={"quipc.op": "trellis_rowsum"})

        def t_at(b, o):
            return t[b, o]
    else:
        def wval(ot, kk, oi):
            return scale[ot * TILE + oi] * _value(args, k, ot * TILE + oi, kk // TILE, kk % TILE)
        t_at = dequant_tile_gemm_te(wval, z, rows, m // TILE, n, TILE, "trellis")
    return te_output_side(t_at, rows, args, spec, residual)
