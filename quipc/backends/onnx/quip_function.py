"""The QuipLinear and QuipLinearGroup operators: one node per quantized linear (or per group
of linears reading the same tensor), defined as ONNX functions.

QuipLinear (domain ai.quipc, version 1, one `overload` per input layout, see Variant):
    inputs : x, codes (m, packed_row_bytes) uint8, scale (m,) fp16, zero (m,) fp16,
             [in_scale (n,) fp16], [out_sign_bits (ceil(m/8),) uint8, np.packbits order],
             input transform, output transform, [bias (m,) fp32]; a transform is given as its
             0-2 Kronecker factors
    attributes: bits, in_features, out_features, block_size, accuracy_level,
                in_transform, out_transform (kind strings: hadamard | kron | identity)
    y = s_out * K_out^T (W' (K_in (in_scale * x))) + bias,  W'[i, j] = scale[i] * code[i, j] + zero[i]

QuipLinearGroup (same domain; layers with equal in_scale and input transform, e.g. q/k/v):
    inputs : x, [in_scale], input transform, then per part i: p{i}.codes, p{i}.scale, p{i}.zero,
             [p{i}.out_sign_bits], p{i} output transform, [p{i}.bias]  (see GroupVariant)
    outputs: one y per part
    attributes: bits, in_features, out_features (the total), out_split (ints, per part),
                block_size, accuracy_level, in_transform, out_transforms (strings),
                layer_names (strings, read by inspect.layers_from_onnx; unused by the body)
    in_scale and K_in once, the parts' codes/scale/zero concatenated (initializers only: folded
    once), one weight product and zero correction, Split, then each part's own output side.
    Stacked output side (overload suffix `_st`: every part's output transform is two factors
    with the same last one, e.g. Hadamard q/k/v (36|12|12 x 16) or gate/up (12|12 x 128)):
    the output transforms run once on the concatenated y, the first factors as one
    block-diagonal matrix built in the body (folded), then one sign multiply, then Split.

Transform forms: k: one MatMul per Kronecker factor plus reshapes; d: n <= 256, one MatMul
by a per-layer dense matrix built in the body from the factors (output side: the signs folded
in), folded per layer. (A shared dense n x n Hadamard for n <= 640 was tried and dropped: for
SmolLM2's 576 it read 1.3 MB per use and was slower than the factors: w4 decode 12.1 vs
11.7 ms per token, prefill of 512 tokens 694 vs 581 ms, onnxruntime CPU, 2 threads.)

Weight products:
- "nbits" (4 bits, or 2 with native_2bit; n a multiple of 16): the packed codes are already MatMulNBits'
  layout (row-major, lowest bits first), reshaped to blocks; the per-row scale is repeated
  per block and the default zero point 2^(bits-1) is corrected by a rank-one term:
  W' z = MatMulNBits(z) + (zero + 2^(bits-1) * scale) * sum(z).
- "repack4" (2 and 3 bits, n a multiple of 16): the dense codes are unpacked in the graph and
  re-packed as 4-bit nibbles for MatMulNBits (bits=4), with the 4-bit correction (zero + 8 scale).
  The file keeps the dense 2/3-bit codes; only the session's memory holds nibbles.
- "unpack" (any bits, standard ops only): the dense packed bytes are unpacked with
  integer arithmetic (8 codes from `bits` bytes), dequantized, and multiplied.
Every weight-side computation depends only on initializers, so onnxruntime folds it once
at session creation; files keep the compact quipc form (3-bit stays 8 codes per 3 bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from quipc_runtime.formats import require_format
from quipc_runtime.layer import QuantizedLinear

from .builder import MS_DOMAIN, OPSET, QUIPC_DOMAIN, Builder, Ref

FLOAT = TensorProto.FLOAT
INT = onnx.AttributeProto.INT
NBITS_BITS = (2, 4)      # onnxruntime's CPU MatMulNBits kernel: 2, 4 (and 8) bits
# Measured on this CPU (onnxruntime 1.32, accuracy_level 4, one 576x1536 / 1536x576 GEMV):
# 4-bit 56-90 us, 2-bit block 64 195 us, 2-bit block 256 9.6 ms (a slow fallback). So 2-bit
# layers are widened to 4-bit nibbles in memory at session creation (the file keeps 2 bits)
# unless native_2bit is asked for.
MAX_BLOCK = 256          # 2-bit MatMulNBits refuses larger blocks


def nbits_block_size(n: int, bits: int) -> int:
    """Largest power-of-two block (16..256) dividing n, or 0 when MatMulNBits cannot be used."""
    if bits not in NBITS_BITS:
        return 0
    bs = MAX_BLOCK
    while bs >= 16:
        if n % bs == 0:
            return bs
        bs //= 2
    return 0


FORMS = ("k", "d")
# How a transform is applied (the `t` part of an overload):
#   k: Kronecker factors, one small MatMul per factor (any n);
#   d: one dense MatMul by the matrix built in the body from the layer's factors (out side:
#      with the output signs folded in); folded per layer at session creation (n <= 256);


def _side_inputs(side: str, form: str, count: int) -> list[str]:
    return [f"{side}_factor{i}" for i in range(count)]


@dataclass(frozen=True)
class Variant:
    mode: str          # nbits | repack4 | unpack
    bits: int
    n_in: int          # Kronecker factors given for the input transform
    n_out: int
    in_scale: bool
    out_signs: bool
    bias: bool
    rank3: bool = False  # x is (batch, seq, n): keeps the leading axes, no dynamic shape ops
    in_form: str = "k"
    out_form: str = "k"

    @property
    def overload(self) -> str:
        flags = "".join(c for c, on in (("s", self.in_scale), ("o", self.out_signs), ("b", self.bias)) if on)
        forms = "" if self.in_form + self.out_form == "kk" else f"_t{self.in_form}{self.out_form}"
        return (f"{self.mode}_b{self.bits}_k{self.n_in}{self.n_out}{forms}" + (f"_{flags}" if flags else "")
                + ("_r3" if self.rank3 else ""))

    @staticmethod
    def parse(overload: str) -> "Variant":
        """The inverse of `overload` (also reads files written before the `t` forms)."""
        mode, bits, k, *rest = overload.split("_")
        forms, flags = "kk", ""
        for part in rest:
            if part.startswith("t"):
                forms = part[1:]
            elif part != "r3":
                flags = part
        return Variant(mode, int(bits[1:]), int(k[1]), int(k[2]), "s" in flags, "o" in flags, "b" in flags,
                       "r3" in rest, forms[0], forms[1])

    def input_names(self) -> list[str]:
        names = ["x", "codes", "scale", "zero"]
        names += ["in_scale"] * self.in_scale + ["out_sign_bits"] * self.out_signs
        names += _side_inputs("in", self.in_form, self.n_in) + _side_inputs("out", self.out_form, self.n_out)
        return names + ["bias"] * self.bias


@dataclass(frozen=True)
class GroupVariant:
    """QuipLinearGroup: layers reading the same x with equal in_scale and input transform.
    All parts share mode, bits, rank3 and the input side (taken from parts[0]); stacked: the
    output transforms run once on the concatenated outputs (see _stackable)."""
    parts: tuple[Variant, ...]
    stacked: bool = False

    @property
    def overload(self) -> str:
        v = self.parts[0]
        head = f"{v.mode}_b{v.bits}_i{v.in_form}{v.n_in}" + ("s" if v.in_scale else "")
        outs = "".join(f"_o{p.out_form}{p.n_out}" + "o" * p.out_signs + "b" * p.bias for p in self.parts)
        return head + outs + ("_st" if self.stacked else "") + ("_r3" if v.rank3 else "")

    @staticmethod
    def parse(overload: str) -> "GroupVariant":
        mode, bits, head, *rest = overload.split("_")
        rank3 = "r3" in rest
        parts = tuple(Variant(mode, int(bits[1:]), int(head[2]), int(o[2]), head.endswith("s"), "o" in o[3:],
                              "b" in o[3:], rank3, head[1], o[1]) for o in rest if o not in ("r3", "st"))
        return GroupVariant(parts, "st" in rest)

    def shared_names(self) -> list[str]:
        v = self.parts[0]
        return ["x"] + ["in_scale"] * v.in_scale + _side_inputs("in", v.in_form, v.n_in)

    def part_names(self, i: int) -> list[str]:
        v = self.parts[i]
        names = ["codes", "scale", "zero"] + ["out_sign_bits"] * v.out_signs
        names += _side_inputs("out", v.out_form, v.n_out) + ["bias"] * v.bias
        return [f"p{i}.{k}" for k in names]

    def input_names(self) -> list[str]:
        return self.shared_names() + [k for i in range(len(self.parts)) for k in self.part_names(i)]


ATTRS = ("bits", "in_features", "out_features", "block_size", "accuracy_level")
# QuipLinearGroup: out_features is the total (MatMulNBits' N); out_split the parts' sizes
GROUP_ATTRS = ATTRS + ("out_split", "in_transform", "out_transforms", "layer_names")


def _attr(b: Builder, lit: dict, key: str):
    return Ref(key, INT) if b.function else int(lit[key])


def _kron(b: Builder, z: str, factors: list[str], transpose: bool, rank3: bool = False) -> str:
    """(F_1 x F_2) z (or its transpose) on the last axis of z (2-D, or 3-D when rank3),
    row-major reshape. The reshape targets depend on initializers only: folded by onnxruntime."""
    if not factors:
        return z
    if len(factors) == 1:
        f = factors[0] if transpose else b.op("Transpose", factors[0], perm=[1, 0])
        return b.op("MatMul", z, f)
    if len(factors) != 2:
        raise ValueError("QuipLinear supports transforms of at most two Kronecker factors")
    fa, fb = factors
    a = b.op("Slice", b.op("Shape", fa), b.ints([0]), b.ints([1]))
    c = b.op("Slice", b.op("Shape", fb), b.ints([0]), b.ints([1]))
    lead = b.ints([0, 0] if rank3 else [-1])
    x3 = b.op("Reshape", z, b.op("Concat", lead, a, c, axis=0))
    if transpose:   # (A^T x B^T) vec(X) = vec(A^T X B)
        t = b.op("MatMul", b.op("Transpose", fa, perm=[1, 0]), b.op("MatMul", x3, fb))
    else:           # (A x B) vec(X) = vec(A X B^T)
        t = b.op("MatMul", fa, b.op("MatMul", x3, b.op("Transpose", fb, perm=[1, 0])))
    return b.op("Reshape", t, b.op("Concat", lead, b.op("Mul", a, c), axis=0))


def _kron_matrix(b: Builder, factors: list[str]) -> str:
    """The dense K = F_1 x F_2 (row-major) from initializers: folded at session creation."""
    if len(factors) == 1:
        return factors[0]
    fa, fb = factors
    prod = b.op("Mul", b.op("Unsqueeze", fa, b.ints([1, 3])), b.op("Unsqueeze", fb, b.ints([0, 2])))  # (a,b,a,b)
    size = b.op("Mul", b.op("Shape", fa, start=0, end=1), b.op("Shape", fb, start=0, end=1))
    return b.op("Reshape", prod, b.op("Concat", size, b.ints([-1]), axis=0))


def _transform_in(b: Builder, v: Variant, z: str, mats: list[str]) -> str:
    """K_in z (row vectors: z K_in^T)."""
    if v.in_form == "d":
        return b.op("MatMul", z, b.op("Transpose", _kron_matrix(b, mats), perm=[1, 0]))
    return _kron(b, z, mats, transpose=False, rank3=v.rank3)


def _transform_out(b: Builder, v: Variant, y: str, mats: list[str], signs: str | None) -> str:
    """s_out * K_out^T y (row vectors: (y K_out) * s = y (K_out diag(s)))."""
    if v.out_form == "d":    # signs folded into the per-layer matrix
        k = _kron_matrix(b, mats) if mats else None
        return b.op("MatMul", y, b.op("Mul", k, signs) if signs else k)
    y = _kron(b, y, mats, transpose=True, rank3=v.rank3)
    return b.op("Mul", y, signs) if signs else y


BITWISE_OPSET = 18   # BitwiseAnd / BitwiseOr


def _uints(b: Builder, values, dtype) -> str:
    return b.const(np.asarray(values, dtype))


def _unpack_codes(b: Builder, codes: str, bits: int, m: str, lit: dict) -> str:
    """(m, n) integer codes from the dense packed bytes. onnxruntime folds this once per
    session for every layer at the same time, so the intermediates' width is the session's
    peak memory: with bitwise ops (opset >= 18) they stay at 1 byte per code (4 for 3 bits);
    the int64 arithmetic fallback for older opsets needs 8."""
    if b.opset < BITWISE_OPSET:
        return _unpack_codes_int64(b, codes, bits, m, lit)
    if 8 % bits == 0:   # 2 and 4 bits: whole codes in each byte, lowest bits first
        shifts = _uints(b, [bits * j for j in range(8 // bits)], np.uint8)
        vals = b.op("BitShift", b.op("Unsqueeze", codes, b.ints([-1])), shifts, direction="RIGHT")
        vals = b.op("BitwiseAnd", vals, _uints(b, [(1 << bits) - 1], np.uint8))           # (m, R, 8/bits)
    else:               # 3 bits: 8 codes in 3 bytes, read as one little-endian uint32 word
        groups = b.op("Cast", b.op("Reshape", codes, b.op("Concat", m, b.ints([-1, 3]), axis=0)),
                      to=TensorProto.UINT32)                                             # (m, G, 3)
        parts = b.op("Split", b.op("BitShift", groups, _uints(b, [0, 8, 16], np.uint32), direction="LEFT"),
                     axis=2, outputs=3, num_outputs=3)
        word = b.op("BitwiseOr", b.op("BitwiseOr", parts[0], parts[1]), parts[2])        # (m, G, 1)
        vals = b.op("BitShift", word, _uints(b, [3 * j for j in range(8)], np.uint32), direction="RIGHT")
        vals = b.op("Cast", b.op("BitwiseAnd", vals, _uints(b, [7], np.uint32)), to=TensorProto.UINT8)
    vals = b.op("Reshape", vals, b.op("Concat", m, b.ints([-1]), axis=0))
    return b.op("Slice", vals, b.ints([0]), b.attr_int("in_features", lit.get("in_features")), b.ints([1]))


def _unpack_codes_int64(b: Builder, codes: str, bits: int, m: str, lit: dict) -> str:
    """(m, n) int64 codes with integer arithmetic only (any opset >= 13)."""
    groups = b.op("Reshape", codes, b.op("Concat", m, b.ints([-1, bits]), axis=0))       # (m, G, bits)
    words = b.op("Mul", b.op("Cast", groups, to=TensorProto.INT64), b.ints([256 ** k for k in range(bits)]))
    words = b.op("ReduceSum", words, b.ints([2]), keepdims=1)                            # (m, G, 1)
    vals = b.op("Div", words, b.ints([1 << (bits * j) for j in range(8)]))
    vals = b.op("Mod", vals, b.ints([1 << bits]))                                        # (m, G, 8)
    vals = b.op("Reshape", vals, b.op("Concat", m, b.ints([-1]), axis=0))
    return b.op("Slice", vals, b.ints([0]), b.attr_int("in_features", lit.get("in_features")), b.ints([1]))


def _unpack_weight(b: Builder, codes: str, scale_f: str, zero: str, bits: int, m: str, lit: dict) -> str:
    """W' (m, n) float from the dense packed codes."""
    vals = _unpack_codes(b, codes, bits, m, lit)
    w = b.op("Mul", b.op("Cast", vals, to=FLOAT), b.op("Unsqueeze", scale_f, b.ints([1])))
    return b.op("Add", w, b.op("Unsqueeze", b.op("Cast", zero, to=FLOAT), b.ints([1])))


def _sign_vector(b: Builder, sign_bits: str, m: str) -> str:
    bits = b.op("Div", b.op("Unsqueeze", b.op("Cast", sign_bits, to=TensorProto.INT64), b.ints([1])),
                b.ints([1 << (7 - j) for j in range(8)]))
    bits = b.op("Reshape", b.op("Mod", bits, b.ints([2])), b.ints([-1]))
    bits = b.op("Slice", bits, b.ints([0]), m)
    return b.op("Sub", b.const(np.float32(1)), b.op("Mul", b.op("Cast", bits, to=FLOAT), b.const(np.float32(2))))


def _input_side(b: Builder, v: Variant, named: dict, n: str) -> str:
    """K_in (in_scale * x), flattened to (rows, n) unless rank3."""
    z = named["x"]
    if v.in_scale:
        z = b.op("Mul", z, b.op("Cast", named["in_scale"], to=FLOAT))
    if not v.rank3:
        z = b.op("Reshape", z, b.op("Concat", b.ints([-1]), n, axis=0))
    return _transform_in(b, v, z, [named[k] for k in _side_inputs("in", v.in_form, v.n_in)])


def _weight_product(b: Builder, v: Variant, z: str, codes: str, scale: str, zero: str, m: str,
                    lit: dict) -> str:
    """W' z for the m rows of codes/scale/zero (m: out_features, the total in a group)."""
    scale_f = b.op("Cast", scale, to=FLOAT)
    if v.mode == "unpack":
        w = _unpack_weight(b, codes, scale_f, zero, v.bits, m, lit)
        return b.op("MatMul", z, b.op("Transpose", w, perm=[1, 0]))
    if v.mode == "nbits":   # the quipc layout is MatMulNBits' layout: only reshaped
        blob = b.op("Div", b.op("Mul", b.attr_int("block_size", lit.get("block_size")),
                                b.attr_int("bits", lit.get("bits"))), b.ints([8]))
        packed = b.op("Reshape", codes, b.op("Concat", m, b.ints([-1]), blob, axis=0))
        kbits, half = _attr(b, lit, "bits"), b.op("Pow", b.const(np.float32(2)), b.op(
            "Cast", b.op("Sub", b.attr_int("bits", lit.get("bits")), b.ints([1])), to=FLOAT))
    else:   # 2/3-bit: unpacked and re-packed as 4-bit nibbles (folded once, at session creation)
        blob = b.op("Div", b.attr_int("block_size", lit.get("block_size")), b.ints([2]))
        packed = b.op("Reshape", _nibbles(b, _unpack_codes(b, codes, v.bits, m, lit), m),
                      b.op("Concat", m, b.ints([-1]), blob, axis=0))
        kbits, half = 4, b.const(np.float32(8))
    kb = b.op("Slice", b.op("Shape", packed), b.ints([1]), b.ints([2]))
    scales = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", scale_f, b.ints([1])),
                                  b.op("Concat", m, kb, axis=0)), b.ints([-1]))
    y = b.op("MatMulNBits", z, packed, scales, domain=MS_DOMAIN,
             K=_attr(b, lit, "in_features"), N=_attr(b, lit, "out_features"),
             bits=kbits, block_size=_attr(b, lit, "block_size"),
             accuracy_level=_attr(b, lit, "accuracy_level"))
    y = b.op("Cast", y, to=FLOAT)   # types the contrib op's output for ONNX shape inference
    corr = b.op("Add", b.op("Cast", zero, to=FLOAT), b.op("Mul", scale_f, half))
    return b.op("Add", y, b.op("Mul", b.op("ReduceSum", z, b.ints([-1]), keepdims=1), corr))


def _nibbles(b: Builder, vals: str, m: str) -> str:
    """(m, n/2) uint8 bytes (code 2k in the low nibble, 2k+1 in the high) from (m, n) codes."""
    pairs = b.op("Reshape", vals, b.op("Concat", m, b.ints([-1, 2]), axis=0))
    if b.opset < BITWISE_OPSET:
        return b.op("Cast", b.op("ReduceSum", b.op("Mul", pairs, b.ints([1, 16])), b.ints([2]), keepdims=0),
                    to=TensorProto.UINT8)
    lo, hi = b.op("Split", pairs, axis=2, outputs=2, num_outputs=2)
    hi = b.op("BitShift", hi, _uints(b, [4], np.uint8), direction="LEFT")
    return b.op("Squeeze", b.op("BitwiseOr", lo, hi), b.ints([2]))


def _rename(b: Builder, old: str, new: str) -> str:
    """Give the node output `old` the name `new` (instead of adding an Identity)."""
    for node in reversed(b.nodes):
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = new
                return new
    raise ValueError(f"{old} is not a node output")


def _output_side(b: Builder, v: Variant, y: str, named: dict, x: str, m: str, out_name: str | None,
                 transformed: bool = False) -> str:
    """s_out * K_out^T y + bias for one layer (named: its inputs without a part prefix);
    transformed: y already is s_out * K_out^T y (a stacked group)."""
    if not transformed:
        signs = _sign_vector(b, named["out_sign_bits"], m) if v.out_signs else None
        y = _transform_out(b, v, y, [named[k] for k in _side_inputs("out", v.out_form, v.n_out)], signs)
    if v.bias:
        y = b.op("Add", y, named["bias"])
    if v.rank3:
        return _rename(b, y, out_name) if out_name else y
    lead = b.op("Slice", b.op("Shape", x), b.ints([0]), b.ints([-1]))
    return b.op("Reshape", y, b.op("Concat", lead, m, axis=0), out_name=out_name)


def emit_body(b: Builder, v: Variant, ins: list[str], lit: dict, out_name: str | None = None) -> str:
    """Write the QuipLinear computation into b; ins follow v.input_names(); returns y."""
    named = dict(zip(v.input_names(), ins))
    n = b.attr_int("in_features", lit.get("in_features"))
    m = b.attr_int("out_features", lit.get("out_features"))
    z = _input_side(b, v, named, n)
    y = _weight_product(b, v, z, named["codes"], named["scale"], named["zero"], m, lit)
    return _output_side(b, v, y, named, named["x"], m, out_name)


def emit_group_body(b: Builder, g: GroupVariant, ins: list[str], lit: dict,
                    out_names: list[str | None]) -> list[str]:
    """QuipLinearGroup: in_scale and K_in once, one weight product on the row-concatenated
    weights (Concat of initializers: folded once), one zero correction, then Split and each
    part's own output side. ins follow g.input_names(); returns the parts' outputs."""
    named = dict(zip(g.input_names(), ins))
    v0, k = g.parts[0], len(g.parts)
    n = b.attr_int("in_features", lit.get("in_features"))
    m = b.attr_int("out_features", lit.get("out_features"))
    z = _input_side(b, v0, named, n)
    cat = {key: b.op("Concat", *[named[f"p{i}.{key}"] for i in range(k)], axis=0)
           for key in ("codes", "scale", "zero")}
    y = _weight_product(b, v0, z, cat["codes"], cat["scale"], cat["zero"], m, lit)
    parts = [{key.split(".", 1)[1]: named[key] for key in g.part_names(i)} for i in range(k)]
    sizes = [b.op("Shape", part["scale"]) for part in parts]    # (m_i,) from initializers: folded
    if g.stacked:
        y = _stacked_output(b, g, y, parts, sizes)
    ys = b.op("Split", y, b.attr_ints("out_split", lit.get("out_split")), axis=-1, outputs=k)
    ys = [ys] if k == 1 else ys
    return [_output_side(b, v, ys[i], parts[i], named["x"], sizes[i], out_names[i], g.stacked)
            for i, v in enumerate(g.parts)]


def _stacked_output(b: Builder, g: GroupVariant, y: str, parts: list[dict], sizes: list[str]) -> str:
    """s * K^T y for the concatenated outputs of a group whose parts' output transforms are
    A_i x B (same B): y viewed as (sum a_i, b) rows, times B, then the block-diagonal of the
    A_i^T from the left (built from initializers: folded), then the concatenated signs."""
    lefts = [part["out_factor0"] for part in parts]
    right = parts[0]["out_factor1"]
    first = lambda t: b.op("Slice", b.op("Shape", t), b.ints([0]), b.ints([1]))  # noqa: E731
    rows = [first(a) for a in lefts]
    total = b.op("ReduceSum", b.op("Concat", *rows, axis=0), keepdims=1)
    blocks, before = [], b.ints([0])
    for a, r in zip(lefts, rows):
        after = b.op("Sub", b.op("Sub", total, before), r)
        pads = b.op("Concat", b.ints([0]), before, b.ints([0]), after, axis=0)
        blocks.append(b.op("Pad", b.op("Transpose", a, perm=[1, 0]), pads))
        before = b.op("Add", before, r)
    diag = b.op("Concat", *blocks, axis=0)                                   # (A, A)
    v = g.parts[0]
    lead = b.ints([0, 0] if v.rank3 else [0])
    inner = first(right)
    t = b.op("MatMul", diag, b.op("MatMul", b.op("Reshape", y, b.op("Concat", lead, b.ints([-1]), inner, axis=0)),
                                  right))
    y = b.op("Reshape", t, b.op("Concat", lead, b.ints([-1]), axis=0))
    if not any(p.out_signs for p in g.parts):
        return y
    signs = [_sign_vector(b, part["out_sign_bits"], m) if p.out_signs
             else b.op("Expand", b.const(np.float32(1)), m) for p, part, m in zip(g.parts, parts, sizes)]
    return b.op("Mul", y, b.op("Concat", *signs, axis=0))


def _function(name: str, overload: str, ins: list[str], outs: list[str], b: Builder, mode: str,
              attrs: list[str], opset: int) -> onnx.FunctionProto:
    opsets = [helper.make_opsetid("", opset)]
    if mode in ("nbits", "repack4"):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    f = helper.make_function(QUIPC_DOMAIN, name, ins, outs, b.nodes, opsets, attributes=attrs,
                             doc_string=f"quipc {name}, layout {overload}: see quipc.backends.onnx.quip_function")
    f.overload = overload
    return f


def make_function(v: Variant, opset: int = OPSET) -> onnx.FunctionProto:
    b = Builder(function=True, opset=opset)
    y = emit_body(b, v, v.input_names(), {}, out_name="y")
    return _function("QuipLinear", v.overload, v.input_names(), [y], b, v.mode,
                     list(ATTRS) + ["in_transform", "out_transform"], opset)


def make_group_function(g: GroupVariant, opset: int = OPSET) -> onnx.FunctionProto:
    b = Builder(function=True, opset=opset)
    outs = emit_group_body(b, g, g.input_names(), {}, [f"y{i}" for i in range(len(g.parts))])
    return _function("QuipLinearGroup", g.overload, g.input_names(), outs, b, g.parts[0].mode,
                     list(GROUP_ATTRS), opset)


DENSE_LAYER_MAX = 256    # any transform up to this n: one MatMul by a per-layer matrix (signs folded)


def _same_input_side(a: QuantizedLinear, b: QuantizedLinear) -> bool:
    """Equal in_scale and input transform (compared as arrays: never assumed)."""
    if (a.bits, a.in_features, a.t_in.kind, tuple(a.t_in.orders)) != (b.bits, b.in_features, b.t_in.kind,
                                                                      tuple(b.t_in.orders)):
        return False
    if (a.in_scale is None) != (b.in_scale is None) or (a.in_scale is not None and not np.array_equal(
            a.in_scale, b.in_scale)):
        return False
    if not np.array_equal(a.t_in.sign_vector(), b.t_in.sign_vector()):
        return False
    return all(np.array_equal(x, y) for x, y in zip(a.t_in.matrices(), b.t_in.matrices()))


def _stackable(outs: list) -> bool:
    """Output transforms that can run once on the concatenated outputs: two Kronecker factors
    each, with the very same last factor (compared as arrays)."""
    mats = [t.matrices() for t in outs]
    return all(len(m) == 2 for m in mats) and all(
        m[1].shape == mats[0][1].shape and np.array_equal(m[1], mats[0][1]) for m in mats[1:])


def _group_name(names: list[str]) -> str:
    """model.layers.0.mlp.gate_proj, ...up_proj -> model.layers.0.mlp.gate_proj+up_proj.QuipLinearGroup"""
    prefix = names[0].rsplit(".", 1)[0] + "."
    if all(n.startswith(prefix) for n in names):
        return prefix + "+".join(n[len(prefix):] for n in names) + ".QuipLinearGroup"
    return "+".join(names) + ".QuipLinearGroup"


class QuipLinearEmitter:
    """Adds quantized linears to a graph Builder: as QuipLinear / QuipLinearGroup nodes
    (ops='quip') or as their standard-op bodies inlined (ops='std')."""

    def __init__(self, b: Builder, ops: str = "quip", accuracy_level: int = 4, opset: int = OPSET,
                 native_2bit: bool = False, dense_layer_max: int = DENSE_LAYER_MAX,
                 stack_outputs: bool = True):
        if ops not in ("quip", "std"):
            raise ValueError(f"unknown ONNX ops mode {ops!r}: expected 'quip' or 'std'")
        self.b, self.ops, self.accuracy_level, self.opset = b, ops, accuracy_level, opset
        self.native_2bit = native_2bit
        self.dense_layer_max, self.stack_outputs = dense_layer_max, stack_outputs
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.uses_ms = False
        self._node_names: set[str] = set()

    def _factors(self, layer: QuantizedLinear, side: str) -> list[str]:
        t = layer.t_in if side == "in" else layer.t_out
        names = []
        for i, (order, mat) in enumerate(zip(t.orders, t.matrices())):
            if t.kind == "hadamard":   # the same for every layer: stored once
                names.append(self.b.initializer(f"quipc.hadamard.{order}", mat))
            else:
                names.append(self.b.initializer(f"{layer.name}.{side}_factor{i}", mat))
        return names

    def _form(self, t, side: str, stacked: bool = False) -> str:
        """How a transform is applied (see FORMS): small ones as one per-layer dense matrix,
        unless the output side is stacked with the rest of its group."""
        mats = t.matrices()
        signs = side == "out" and t.signs is not None
        fold = bool(mats) and t.n <= self.dense_layer_max and (len(mats) > 1 or signs)
        return "d" if fold and not stacked else "k"

    def _plan(self, layer: QuantizedLinear, rank: int | None, input_side: bool = True,
              stacked: bool = False) -> tuple[Variant, dict, dict]:
        """The layer's Variant, literal attributes, and its inputs by Variant.input_names() key;
        input_side=False: a group's later part, whose in_scale / input transform are not added;
        stacked: its output transform runs stacked with its group's (kept as factors)."""
        require_format(layer, ("grid",), "the ONNX backend")
        b, name = self.b, layer.name
        block, mode = 0, "unpack"
        if self.ops == "quip":
            native = layer.bits == 4 or (layer.bits == 2 and self.native_2bit)
            block = nbits_block_size(layer.in_features, layer.bits if native else 4)
            if native and layer.bits == 2:
                block = min(block, 128)   # 2-bit blocks of 256 hit a slow kernel
            mode = ("nbits" if native else "repack4") if block else "unpack"
        in_form = self._form(layer.t_in, "in")
        in_mats = self._factors(layer, "in") if input_side else []
        n_in = len(layer.t_in.matrices())
        out_form, out_mats = self._form(layer.t_out, "out", stacked), self._factors(layer, "out")
        v = Variant(mode, layer.bits, n_in, len(out_mats), layer.in_scale is not None,
                    layer.t_out.signs is not None, layer.bias is not None, rank == 3, in_form, out_form)
        named = {"codes": b.initializer(f"{name}.codes", layer.codes),
                 "scale": b.initializer(f"{name}.scale", layer.scale),
                 "zero": b.initializer(f"{name}.zero", layer.zero)}
        if v.in_scale and input_side:
            named["in_scale"] = b.initializer(f"{name}.in_scale", layer.in_scale)
        if v.out_signs:
            named["out_sign_bits"] = b.initializer(f"{name}.out_sign_bits", layer.t_out.sign_bits())
        named.update(zip(_side_inputs("in", in_form, n_in), in_mats))
        named.update(zip(_side_inputs("out", out_form, len(out_mats)), out_mats))
        if v.bias:
            named["bias"] = b.initializer(f"{name}.bias", layer.bias.astype(np.float32))
        lit = {"bits": layer.bits, "in_features": layer.in_features, "out_features": layer.out_features,
               "block_size": block, "accuracy_level": self.accuracy_level}
        return v, lit, named

    def _node(self, op: str, ins: list[str], outs: list[str], name: str, overload: str, **attrs) -> None:
        if name in self._node_names:   # the same layer applied twice
            name = self.b.name(name)
        self._node_names.add(name)
        node = helper.make_node(op, ins, outs, name=name, domain=QUIPC_DOMAIN, **attrs)
        node.overload = overload
        self.b.nodes.append(node)

    def emit(self, x: str, layer: QuantizedLinear, out_name: str | None = None, rank: int | None = None) -> str:
        """y = layer(x); rank: x's rank when known (3 gives a body without shape ops)."""
        v, lit, named = self._plan(layer, rank)
        ins = [x] + [named[k] for k in v.input_names()[1:]]
        if self.ops == "std":
            return emit_body(self.b, v, ins, lit, out_name=out_name)
        self.uses_ms |= v.mode != "unpack"
        if ("QuipLinear", v.overload) not in self.functions:
            self.functions[("QuipLinear", v.overload)] = make_function(v, self.opset)
        out = out_name or self.b.name(f"{layer.name}.out")
        self._node("QuipLinear", ins, [out], f"{layer.name}.QuipLinear", v.overload,
                   in_transform=layer.t_in.kind, out_transform=layer.t_out.kind, **lit)
        return out

    def can_group(self, layers: list[QuantizedLinear]) -> bool:
        return len(layers) > 1 and all(_same_input_side(layers[0], la) for la in layers[1:])

    def emit_group(self, x: str, layers: list[QuantizedLinear], out_names: list[str | None] | None = None,
                   rank: int | None = None) -> list[str]:
        """[layer(x) for layer in layers]: one QuipLinearGroup node when they share in_scale and
        input transform (ops='quip'; 'std' inlines its body), else one node per layer."""
        out_names = out_names or [None] * len(layers)
        if not self.can_group(layers):
            return [self.emit(x, la, o, rank) for la, o in zip(layers, out_names)]
        stack = self.stack_outputs and _stackable([la.t_out for la in layers])
        plans = [self._plan(la, rank, input_side=i == 0, stacked=stack) for i, la in enumerate(layers)]
        g = GroupVariant(tuple(p[0] for p in plans), stack)
        lit = dict(plans[0][1], out_features=sum(la.out_features for la in layers),
                   out_split=[la.out_features for la in layers])
        ins = [x] + [plans[0][2][k] for k in g.shared_names()[1:]]
        ins += [p[2][k.split(".", 1)[1]] for i, p in enumerate(plans) for k in g.part_names(i)]
        if self.ops == "std":
            return emit_group_body(self.b, g, ins, lit, out_names)
        self.uses_ms |= g.parts[0].mode != "unpack"
        if ("QuipLinearGroup", g.overload) not in self.functions:
            self.functions[("QuipLinearGroup", g.overload)] = make_group_function(g, self.opset)
        outs = [o or self.b.name(f"{la.name}.out") for la, o in zip(layers, out_names)]
        self._node("QuipLinearGroup", ins, outs, _group_name([la.name for la in layers]),
                   g.overload, in_transform=layers[0].t_in.kind, out_transforms=[la.t_out.kind for la in layers],
                   layer_names=[la.name for la in layers], **lit)
        return outs

    def opsets(self) -> list:
        ops = [helper.make_opsetid("", self.opset)]
        if self.ops == "quip":
            ops.append(helper.make_opsetid(QUIPC_DOMAIN, 1))
        if self.uses_ms:
            ops.append(helper.make_opsetid(MS_DOMAIN, 1))
        return ops
