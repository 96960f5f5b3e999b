"""The decode GEMV of 4-bit codes on int8 activations (x86 CPUs with AVX2), as one TIR extern.

    z  -> step = max|z| / 127,  zq = round(z / step)  (int8, one scale per row of z)
    acc_s[o] = sum_k code_s[o, k] * zq[k]             (int32, exact; one per 4-bit stage s)
    code . z ~= step * acc,   sum(z) ~= step * sum(zq)

The caller turns acc into the layer's t = scale * code . z + zero * sum(z) with the *quantized*
sum, so the zero points see the same activations as the codes (with sum(z) the codes' mean
times the rounding errors shows up in the output: the C++ kernels measured +3 % perplexity).
z has been through the Hadamard transform, so it has no outliers, and one step per row keeps
the accumulation in int32 for the whole row.

The codes are read in the 4-bit plane layout of tir_quip_linear (int32 words
plane[o // 16, k // 8, o % 16]), whose nibble order puts code j of a word at bit
8 (j % 4) + 4 (j // 4): viewed as bytes, one 32-byte load holds 8 rows x 4 columns, the low
nibbles columns k..k+3 and the high nibbles k+4..k+7. Per 64 weights: one load, a mask and a
shift, two vpmaddubsw against the 4 broadcast activations of each half, one vpaddw and one
vpmaddwd into the 8 rows' int32 sums (the fp32 GEMV spends a shift, a mask, a conversion and an
FMA per weight and row lane). Both stages of a "grid4x2" layer share one quantization.

TE schedules cannot emit vpmaddubsw here (TVM's tensorize crashes in this build), so the
kernel is a TIR statement (te.extern) written with the IR builder; it is only used for
targets with AVX2 (`supported`).
"""
from __future__ import annotations

import dataclasses

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

WORD = 8           # codes per int32 word of a 4-bit plane
VEC = 8            # fp32 / int32 lanes of one AVX2 register
FORMATS = ("grid", "grid4x2", "int8x2")
PREFETCH_BYTES = 8192   # as cpp/prefetch.h


def supported(target) -> bool:
    """Whether `target` (a tvm Target) can run this kernel: an x86 llvm target with AVX2."""
    from tvm.target import codegen

    if target.kind.name != "llvm" or "x86_64" not in str(target.attrs.get("mtriple", "x86_64")):
        return False
    try:
        return bool(codegen.target_has_features("avx2", target))
    except Exception:  # noqa: BLE001  (an LLVM without the x86 backend)
        return False


def applies(spec) -> bool:
    """Layers this kernel computes: 4-bit codes in the grid planes (the grid format, 2-bit e8p
    layers mapped onto it, and the two stages of a 4-bit e8p layer)."""
    return spec.bits == 4 and spec.format in FORMATS


def _pmaddubsw(u8, i8):
    return tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", u8, i8)


def _pmaddwd(a, b):
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", a, b)


def _bcast4(buf, idx):
    """The 4 int8 at buf[idx..idx+3] repeated over 32 bytes."""
    return tirx.reinterpret("int8x32", tirx.Broadcast(tirx.reinterpret("int32", buf.vload(idx, "int8x4")), VEC))


def _quantize_row(z, b, zq, aux, k_pad: int):
    """zq[0:k_pad] = round(z[b] / step); aux[b] = (step, step * sum(zq))."""
    f8, i8 = "float32x8", "int32x8"
    vmax = T.alloc_buffer((VEC,), "float32", scope="local")
    vsum = T.alloc_buffer((VEC,), "int32", scope="local")
    lanes = tirx.Ramp(0, 1, VEC)
    T.buffer_store(vmax, tirx.Broadcast(tirx.const(0.0, "float32"), VEC), [lanes])
    T.buffer_store(vsum, tirx.Broadcast(tirx.const(0, "int32"), VEC), [lanes])
    with T.serial(0, k_pad // VEC) as kv:
        T.buffer_store(vmax, tirx.max(vmax.vload([0], f8), tirx.abs(z.vload([b, kv * VEC], f8))), [lanes])
    amax = vmax[0]
    for i in range(1, VEC):
        amax = tirx.max(amax, vmax[i])
    scalars = T.alloc_buffer((2,), "float32", scope="local")   # max|z|, 127 / max|z|: once per row
    T.buffer_store(scalars, amax, [0])
    amax = scalars[0]
    T.buffer_store(scalars, tirx.Select(amax > 0, tirx.const(127.0, "float32") / amax,
                                        tirx.const(0.0, "float32")), [1])
    with T.serial(0, k_pad // VEC) as kv:
        q = tirx.nearbyint(z.vload([b, kv * VEC], f8) * tirx.Broadcast(scalars[1], VEC)).astype(i8)
        T.buffer_store(zq, q.astype("int8x8"), [tirx.Ramp(kv * VEC, 1, VEC)])
        T.buffer_store(vsum, vsum.vload([0], i8) + q, [lanes])
    total = vsum[0]
    for i in range(1, VEC):
        total = total + vsum[i]
    step = amax * tirx.const(1.0 / 127.0, "float32")
    T.buffer_store(aux, step, [b, 0])
    T.buffer_store(aux, step * total.astype("float32"), [b, 1])


def _prefetch(flat, at, size: int):
    """Ask for the cache line PREFETCH_BYTES after byte `at` of the flat uint8 buffer (clamped to
    its last byte) (cpp/prefetch.h: the decode GEMVs wait on their weight stream otherwise)."""
    idx = tirx.min(at + PREFETCH_BYTES, size - 1)
    T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch", tirx.address_of(flat[idx]), tirx.const(0, "int32"),
                                     tirx.const(3, "int32"), tirx.const(1, "int32")))


def _gemv_tile(plane_u8, flat, zq, acc, s: int, b, ot, k_pad: int, tile: int):
    """acc[s, b, ot*tile : (ot+1)*tile] = codes of the tile's rows . zq (int32), 8 rows a register;
    flat: the same plane as one uint8 array, for the prefetches (one per 64 bytes read)."""
    sums = T.alloc_buffer((tile,), "int32", scope="local")
    for r in range(0, tile, VEC):
        T.buffer_store(sums, tirx.Broadcast(tirx.const(0, "int32"), VEC), [tirx.Ramp(r, 1, VEC)])
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    low = tirx.Broadcast(tirx.const(15, "uint8"), 32)
    four = tirx.Broadcast(tirx.const(4, "uint8"), 32)
    with T.serial(0, k_pad // WORD) as kw:
        a_lo, a_hi = _bcast4(zq, [kw * WORD]), _bcast4(zq, [kw * WORD + 4])
        for r in range(0, tile, VEC):
            if r % 16 == 0:   # rows r..r+15 of this word column: 64 bytes
                _prefetch(flat, ((ot * (k_pad // WORD) + kw) * tile + r) * 4, int(flat.shape[0]))
            w = plane_u8.vload([ot, kw, r, 0], "uint8x32")
            dot = _pmaddubsw(w & low, a_lo) + _pmaddubsw(w >> four, a_hi)
            T.buffer_store(sums, sums.vload([r], "int32x8") + _pmaddwd(dot, ones), [tirx.Ramp(r, 1, VEC)])
    for r in range(0, tile, VEC):
        T.buffer_store(acc, sums.vload([r], "int32x8"), [s, b, tirx.Ramp(ot * tile + r, 1, VEC)])


def gemv_te(z, planes, spec, rows, name: str):
    """(acc_at(s, b, o) -> step * code_s[o] . zq as float32, zsum_at(b) -> step * sum(zq)).
    z: (rows, k_pad) float32, zero beyond n; planes: the 4-bit planes (int32) of each stage,
    (row tiles, k_pad / 8, rows per tile) as tir_quip_linear lays them out."""
    n_ot, n_kw, tile = (int(d) for d in planes[0].shape)
    k_pad = n_kw * WORD
    if tile % VEC:
        raise ValueError(f"int8 GEMV: row tiles of {tile} are not a multiple of {VEC}")

    def stmt(ins, outs):
        zb, *pl = ins
        acc, aux = outs
        with IRBuilder() as ib:
            with T.serial(0, rows) as b:
                zq = T.alloc_buffer((k_pad,), "int8", scope="global")
                _quantize_row(zb, b, zq, aux, k_pad)
                with T.parallel(0, n_ot) as ot:
                    for s, p in enumerate(pl):
                        u8 = T.decl_buffer((n_ot, n_kw, tile, 4), "uint8", data=p.data)
                        flat = T.decl_buffer((n_ot * n_kw * tile * 4,), "uint8", data=p.data)
                        _gemv_tile(u8, flat, zq, acc, s, b, ot, k_pad, tile)
        return ib.get()

    acc, aux = te.extern([(len(planes), rows, spec.o_pad), (rows, 2)], [z, *planes], stmt,
                         dtype=["int32", "float32"], name=name)

    def acc_at(s, b, o):
        return aux[b, 0] * acc[s, b, o].astype("float32")

    def zsum_at(b):
        return aux[b, 1]
    return acc_at, zsum_at


ACTIVATIONS = ("int8", "fp32")   # --tvm-activations


def use_int8(activations: str, target) -> bool:
    """Whether a build for `target` runs its 4-bit decode GEMVs on int8 activations: asked for
    ("int8", the default) and the target can (x86 with AVX2); elsewhere they stay fp32."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown TVM activation type {activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    return activations == "int8" and supported(target)


def for_decode(spec, int8: bool):
    """The spec of the decode (GEMV) kernel of a layer: on int8 activations where it applies."""
    return dataclasses.replace(spec, int8_acts=True) if int8 and applies(spec) else spec
