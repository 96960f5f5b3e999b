"""How QuipLinear's body applies a layer's transforms and output signs (rows are vectors:
K z is written z K^T). The same for every code format."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .builder import Builder
from .variants import GroupVariant, Variant

FLOAT = TensorProto.FLOAT


def kron(b: Builder, z: str, factors: list[str], transpose: bool, rank3: bool = False) -> str:
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


def kron_matrix(b: Builder, factors: list[str]) -> str:
    """The dense K = F_1 x F_2 (row-major) from initializers: folded at session creation."""
    if len(factors) == 1:
        return factors[0]
    fa, fb = factors
    prod = b.op("Mul", b.op("Unsqueeze", fa, b.ints([1, 3])), b.op("Unsqueeze", fb, b.ints([0, 2])))  # (a,b,a,b)
    size = b.op("Mul", b.op("Shape", fa, start=0, end=1), b.op("Shape", fb, start=0, end=1))
    return b.op("Reshape", prod, b.op("Concat", size, b.ints([-1]), axis=0))


def transform_in(b: Builder, v: Variant, z: str, mats: list[str]) -> str:
    """K_in z (row vectors: z K_in^T)."""
    if v.in_form == "d":
        return b.op("MatMul", z, b.op("Transpose", kron_matrix(b, mats), perm=[1, 0]))
    return kron(b, z, mats, transpose=False, rank3=v.rank3)


def transform_out(b: Builder, v: Variant, y: str, mats: list[str], signs: str | None) -> str:
    """s_out * K_out^T y (row vectors: (y K_out) * s = y (K_out diag(s)))."""
    if v.out_form == "d":    # signs folded into the per-layer matrix
        k = kron_matrix(b, mats) if mats else None
        return b.op("MatMul", y, b.op("Mul", k, signs) if signs else k)
    y = kron(b, y, mats, transpose=True, rank3=v.rank3)
    return b.op("Mul", y, signs) if signs else y


def sign_vector(b: Builder, sign_bits: str, m: str) -> str:
    bits = b.op("Div", b.op("Unsqueeze", b.op("Cast", sign_bits, to=TensorProto.INT64), b.ints([1])),
                b.ints([1 << (7 - j) for j in range(8)]))
    bits = b.op("Reshape", b.op("Mod", bits, b.ints([2])), b.ints([-1]))
    bits = b.op("Slice", bits, b.ints([0]), m)
    return b.op("Sub", b.const(np.float32(1)), b.op("Mul", b.op("Cast", bits, to=FLOAT), b.const(np.float32(2))))


def stacked_output(b: Builder, g: GroupVariant, y: str, parts: list[dict], sizes: list[str]) -> str:
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
    signs = [sign_vector(b, part["out_sign_bits"], m) if p.out_signs
             else b.op("Expand", b.const(np.float32(1)), m) for p, part, m in zip(g.parts, parts, sizes)]
    return b.op("Mul", y, b.op("Concat", *signs, axis=0))
