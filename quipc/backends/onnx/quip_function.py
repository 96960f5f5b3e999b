"""The QuipLinear operator: one node per quantized linear, defined as an ONNX function.

Node (domain ai.quipc, version 1, op QuipLinear, one `overload` per input layout):
    inputs : x, codes (m, packed_row_bytes) uint8, scale (m,) fp16, zero (m,) fp16,
             [in_scale (n,) fp16], [out_sign_bits (ceil(m/8),) uint8, np.packbits order],
             in-transform factors (0-2 float matrices), out-transform factors (0-2), [bias (m,) fp32]
    attributes: bits, in_features, out_features, block_size, accuracy_level,
                in_transform, out_transform (kind strings: hadamard | kron | identity)
    y = s_out * K_out^T (W' (K_in (in_scale * x))) + bias,  W'[i, j] = scale[i] * code[i, j] + zero[i]

Two bodies:
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


@dataclass(frozen=True)
class Variant:
    mode: str          # nbits | unpack
    bits: int
    n_in: int          # number of Kronecker factors of the input transform
    n_out: int
    in_scale: bool
    out_signs: bool
    bias: bool
    rank3: bool = False  # x is (batch, seq, n): keeps the leading axes, no dynamic shape ops

    @property
    def overload(self) -> str:
        flags = "".join(c for c, on in (("s", self.in_scale), ("o", self.out_signs), ("b", self.bias)) if on)
        return (f"{self.mode}_b{self.bits}_k{self.n_in}{self.n_out}" + (f"_{flags}" if flags else "")
                + ("_r3" if self.rank3 else ""))

    def input_names(self) -> list[str]:
        names = ["x", "codes", "scale", "zero"]
        names += ["in_scale"] * self.in_scale + ["out_sign_bits"] * self.out_signs
        names += [f"in_factor{i}" for i in range(self.n_in)] + [f"out_factor{i}" for i in range(self.n_out)]
        return names + ["bias"] * self.bias


ATTRS = ("bits", "in_features", "out_features", "block_size", "accuracy_level")


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


def _unpack_codes(b: Builder, codes: str, bits: int, lit: dict) -> str:
    """(m, n) int64 codes from the dense packed bytes, with integer ops only."""
    m = b.attr_int("out_features", lit.get("out_features"))
    groups = b.op("Reshape", codes, b.op("Concat", m, b.ints([-1, bits]), axis=0))       # (m, G, bits)
    words = b.op("Mul", b.op("Cast", groups, to=TensorProto.INT64), b.ints([256 ** k for k in range(bits)]))
    words = b.op("ReduceSum", words, b.ints([2]), keepdims=1)                            # (m, G, 1)
    vals = b.op("Div", words, b.ints([1 << (bits * j) for j in range(8)]))
    vals = b.op("Mod", vals, b.ints([1 << bits]))                                        # (m, G, 8)
    vals = b.op("Reshape", vals, b.op("Concat", m, b.ints([-1]), axis=0))
    return b.op("Slice", vals, b.ints([0]), b.attr_int("in_features", lit.get("in_features")), b.ints([1]))


def _unpack_weight(b: Builder, codes: str, scale_f: str, zero: str, bits: int, lit: dict) -> str:
    """W' (m, n) float from the dense packed codes."""
    vals = _unpack_codes(b, codes, bits, lit)
    w = b.op("Mul", b.op("Cast", vals, to=FLOAT), b.op("Unsqueeze", scale_f, b.ints([1])))
    return b.op("Add", w, b.op("Unsqueeze", b.op("Cast", zero, to=FLOAT), b.ints([1])))


def _sign_vector(b: Builder, sign_bits: str, lit: dict) -> str:
    bits = b.op("Div", b.op("Unsqueeze", b.op("Cast", sign_bits, to=TensorProto.INT64), b.ints([1])),
                b.ints([1 << (7 - j) for j in range(8)]))
    bits = b.op("Reshape", b.op("Mod", bits, b.ints([2])), b.ints([-1]))
    bits = b.op("Slice", bits, b.ints([0]), b.attr_int("out_features", lit.get("out_features")))
    return b.op("Sub", b.const(np.float32(1)), b.op("Mul", b.op("Cast", bits, to=FLOAT), b.const(np.float32(2))))


def emit_body(b: Builder, v: Variant, ins: list[str], lit: dict, out_name: str | None = None) -> str:
    """Write the QuipLinear computation into b; ins follow v.input_names(); returns y."""
    named = dict(zip(v.input_names(), ins))
    fin = [named[f"in_factor{i}"] for i in range(v.n_in)]
    fout = [named[f"out_factor{i}"] for i in range(v.n_out)]
    x = named["x"]
    n = b.attr_int("in_features", lit.get("in_features"))
    m = b.attr_int("out_features", lit.get("out_features"))
    z = x
    if v.in_scale:
        z = b.op("Mul", z, b.op("Cast", named["in_scale"], to=FLOAT))
    if not v.rank3:
        z = b.op("Reshape", z, b.op("Concat", b.ints([-1]), n, axis=0))
    z = _kron(b, z, fin, transpose=False, rank3=v.rank3)
    scale_f = b.op("Cast", named["scale"], to=FLOAT)
    if v.mode in ("nbits", "repack4"):
        if v.mode == "nbits":   # the quipc layout is MatMulNBits' layout: only reshaped
            blob = b.op("Div", b.op("Mul", b.attr_int("block_size", lit.get("block_size")),
                                    b.attr_int("bits", lit.get("bits"))), b.ints([8]))
            packed = b.op("Reshape", named["codes"], b.op("Concat", m, b.ints([-1]), blob, axis=0))
            kbits, half = _attr(b, lit, "bits"), b.op("Pow", b.const(np.float32(2)), b.op(
                "Cast", b.op("Sub", b.attr_int("bits", lit.get("bits")), b.ints([1])), to=FLOAT))
        else:   # 2/3-bit: unpacked and re-packed as 4-bit nibbles (folded once, at session creation)
            pairs = b.op("Reshape", _unpack_codes(b, named["codes"], v.bits, lit),
                         b.op("Concat", m, b.ints([-1, 2]), axis=0))
            nib = b.op("ReduceSum", b.op("Mul", pairs, b.ints([1, 16])), b.ints([2]), keepdims=0)
            blob = b.op("Div", b.attr_int("block_size", lit.get("block_size")), b.ints([2]))
            packed = b.op("Reshape", b.op("Cast", nib, to=TensorProto.UINT8),
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
        corr = b.op("Add", b.op("Cast", named["zero"], to=FLOAT), b.op("Mul", scale_f, half))
        y = b.op("Add", y, b.op("Mul", b.op("ReduceSum", z, b.ints([-1]), keepdims=1), corr))
    else:
        w = _unpack_weight(b, named["codes"], scale_f, named["zero"], v.bits, lit)
        y = b.op("MatMul", z, b.op("Transpose", w, perm=[1, 0]))
    y = _kron(b, y, fout, transpose=True, rank3=v.rank3)
    if v.out_signs:
        y = b.op("Mul", y, _sign_vector(b, named["out_sign_bits"], lit))
    if v.bias:
        y = b.op("Add", y, named["bias"])
    if v.rank3:
        if out_name:   # rename the last node's output instead of adding an Identity
            assert b.nodes[-1].output[0] == y
            b.nodes[-1].output[0] = y = out_name
        return y
    lead = b.op("Slice", b.op("Shape", x), b.ints([0]), b.ints([-1]))
    return b.op("Reshape", y, b.op("Concat", lead, m, axis=0), out_name=out_name)


def make_function(v: Variant, opset: int = OPSET) -> onnx.FunctionProto:
    b = Builder(function=True)
    y = emit_body(b, v, v.input_names(), {}, out_name="y")
    opsets = [helper.make_opsetid("", opset)]
    if v.mode in ("nbits", "repack4"):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    f = helper.make_function(QUIPC_DOMAIN, "QuipLinear", v.input_names(), [y], b.nodes, opsets,
                             attributes=list(ATTRS) + ["in_transform", "out_transform"],
                             doc_string=f"quipc QuipLinear, layout {v.overload}: see quipc.backends.onnx.quip_function")
    f.overload = v.overload
    return f


class QuipLinearEmitter:
    """Adds quantized linears to a graph Builder: as QuipLinear nodes (ops='quip') or as
    their standard-op bodies inlined (ops='std')."""

    def __init__(self, b: Builder, ops: str = "quip", accuracy_level: int = 4, opset: int = OPSET,
                 native_2bit: bool = False):
        if ops not in ("quip", "std"):
            raise ValueError(f"unknown ONNX ops mode {ops!r}: expected 'quip' or 'std'")
        self.b, self.ops, self.accuracy_level, self.opset = b, ops, accuracy_level, opset
        self.native_2bit = native_2bit
        self.functions: dict[str, onnx.FunctionProto] = {}
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

    def emit(self, x: str, layer: QuantizedLinear, out_name: str | None = None, rank: int | None = None) -> str:
        """y = layer(x); rank: x's rank when known (3 gives a body without shape ops)."""
        b, name = self.b, layer.name
        block, mode = 0, "unpack"
        if self.ops == "quip":
            native = layer.bits == 4 or (layer.bits == 2 and self.native_2bit)
            block = nbits_block_size(layer.in_features, layer.bits if native else 4)
            if native and layer.bits == 2:
                block = min(block, 128)   # 2-bit blocks of 256 hit a slow kernel
            mode = ("nbits" if native else "repack4") if block else "unpack"
        v = Variant(mode, layer.bits, len(layer.t_in.matrices()),
                    len(layer.t_out.matrices()), layer.in_scale is not None,
                    layer.t_out.signs is not None, layer.bias is not None, rank == 3)
        ins = [x, b.initializer(f"{name}.codes", layer.codes), b.initializer(f"{name}.scale", layer.scale),
               b.initializer(f"{name}.zero", layer.zero)]
        if v.in_scale:
            ins.append(b.initializer(f"{name}.in_scale", layer.in_scale))
        if v.out_signs:
            ins.append(b.initializer(f"{name}.out_sign_bits", layer.t_out.sign_bits()))
        ins += self._factors(layer, "in") + self._factors(layer, "out")
        if v.bias:
            ins.append(b.initializer(f"{name}.bias", layer.bias.astype(np.float32)))
        lit = {"bits": layer.bits, "in_features": layer.in_features, "out_features": layer.out_features,
               "block_size": block, "accuracy_level": self.accuracy_level}
        if self.ops == "std":
            return emit_body(b, v, ins, lit, out_name=out_name)
        if v.mode != "unpack":
            self.uses_ms = True
        if v.overload not in self.functions:
            self.functions[v.overload] = make_function(v, self.opset)
        out = out_name or b.name(f"{name}.out")
        node_name = f"{name}.QuipLinear"
        if node_name in self._node_names:   # the same layer applied twice
            node_name = b.name(node_name)
        self._node_names.add(node_name)
        node = helper.make_node("QuipLinear", ins, [out], name=node_name, domain=QUIPC_DOMAIN,
                                in_transform=layer.t_in.kind, out_transform=layer.t_out.kind, **lit)
        node.overload = v.overload
        b.nodes.append(node)
        return out

    def opsets(self) -> list:
        ops = [helper.make_opsetid("", self.opset)]
        if self.ops == "quip":
            ops.append(helper.make_opsetid(QUIPC_DOMAIN, 1))
        if self.uses_ms:
            ops.append(helper.make_opsetid(MS_DOMAIN, 1))
        return ops
