"""The quantized token embedding in ONNX: a row gather + dequantize, no dense table.

Graph (standard ops, opset >= 18 for the bitwise unpacking): the ids are flattened, the
packed code rows of those ids gathered (Gather on the uint8 codes) and decoded: an integer
table's rows unpacked (formats.grid.unpack_codes) and dequantized with the gathered per-row
(or per-group) fp16 scale and zero; for a tied model whose table is the lm_head's codes, the
rows decoded by the head's format lowering (`dequantize`, the ops of QuipLinear's weight; a
trellis id's whole 16-row tile, then its row), multiplied by K_in (rows @ K_in, one small
MatMul per Kronecker factor) and in_scale:
    E[i] = (W'[i] @ K_in) * in_scale     (quipc_runtime.embedding)
A shared head's codes, scales, zeros and in_scale are the very initializers of the lm_head's
QuipLinear node (same names): the file holds the table once.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from quipc_runtime.embedding import EmbeddingTable, check_shared_head
from quipc_runtime.formats import get_format
from quipc_runtime.layer import QuantizedLinear

from .builder import Builder
from .formats import get_lowering
from .formats.grid import unpack_codes as _unpack_codes
from .formats.nbits import BITWISE_OPSET

FLOAT = TensorProto.FLOAT


def embedding_fn(source, name: str = "model.embed_tokens"):
    """fn(b, ids) -> (batch, seq, n) float embeddings, for a shared head or an integer table."""
    if isinstance(source, QuantizedLinear):
        check_shared_head(source)
        n = source.in_features
        name = source.name   # QuipLinear's initializer names: one table in the file
    elif isinstance(source, EmbeddingTable):
        n = source.dim
    else:
        raise TypeError(f"expected a QuantizedLinear or an EmbeddingTable, got {type(source).__name__}")

    def fn(b: Builder, ids: str) -> str:
        if b.opset < BITWISE_OPSET:
            raise ValueError(f"the quantized embedding needs opset >= {BITWISE_OPSET}")
        shape = b.op("Shape", ids)
        flat = b.op("Reshape", ids, b.ints([-1]))                               # (K,)
        k = b.op("Shape", flat)                                                 # [K]
        if isinstance(source, EmbeddingTable):
            rows = _table_rows(b, source, name, flat, k)
        else:
            rows = _head_rows(b, source, name, flat, k)                         # W'[ids]
            rows = _times_kron(b, rows, k, source.t_in.matrices(), f"{name}.embed_k_in")
            if source.in_scale is not None:
                in_scale = b.op("Cast", b.initializer(f"{name}.in_scale", source.in_scale), to=FLOAT)
                rows = b.op("Mul", rows, in_scale)
        return b.op("Reshape", rows, b.op("Concat", shape, b.ints([n]), axis=0))

    return fn


def _table_rows(b: Builder, table: EmbeddingTable, name: str, flat: str, k: str) -> str:
    n, bits = table.dim, table.bits
    codes = b.op("Gather", b.initializer(f"{name}.codes", table.codes), flat, axis=0)
    scale = b.op("Cast", b.op("Gather", b.initializer(f"{name}.scale", table.scale), flat, axis=0), to=FLOAT)
    zero = b.op("Cast", b.op("Gather", b.initializer(f"{name}.zero", table.zero), flat, axis=0), to=FLOAT)
    if bits == 8:
        vals = b.op("Cast", codes, to=FLOAT)                                    # (K, n)
    else:
        vals = b.op("Cast", _unpack_codes(b, codes, bits, k, {"in_features": n}), to=FLOAT)
    groups = b.op("Reshape", vals, b.op("Concat", k, b.ints([n // table.group, table.group]), axis=0))
    rows = b.op("Add", b.op("Mul", groups, b.op("Unsqueeze", scale, b.ints([-1]))),
                b.op("Unsqueeze", zero, b.ints([-1])))
    return b.op("Reshape", rows, b.op("Concat", k, b.ints([n]), axis=0))


def _head_rows(b: Builder, head: QuantizedLinear, name: str, flat: str, k: str) -> str:
    """W'[ids] (K, n): the head's code rows of the ids decoded by its format's lowering; a format
    whose rows decode only in groups (trellis: 16-row tiles) gathers and decodes each id's group,
    then picks the id's row in it."""
    low, g = get_lowering(head.format), get_format(head.format).row_group
    lit = {"in_features": head.in_features}
    init = {key: b.initializer(f"{name}.{key}", getattr(head, key)) for key in low.weight_keys}
    if g == 1:
        rows_of, count = flat, k
    else:
        first = b.op("Mul", b.op("Div", flat, b.ints([g])), b.ints([g]))          # (K,) the group's first row
        rows_of = b.op("Reshape", b.op("Add", b.op("Unsqueeze", first, b.ints([1])), b.ints(list(range(g)))),
                       b.ints([-1]))                                            # (K g,)
        count = b.op("Shape", rows_of)
    picked = {key: b.op("Gather", arr, rows_of, axis=0) for key, arr in init.items()}
    rows = low.dequantize(b, head.bits, picked, count, lit)                     # (K g, n)
    if g == 1:
        return rows
    # row i of the K groups: flat index g * i + (id mod g)
    at = b.op("Range", b.const(np.int64(0)), b.op("Squeeze", k, b.ints([0])), b.const(np.int64(1)))
    at = b.op("Add", b.op("Mul", at, b.ints([g])), b.op("Mod", flat, b.ints([g])))
    return b.op("Gather", rows, at, axis=0)


def _times_kron(b: Builder, rows: str, k: str, mats: list, prefix: str) -> str:
    """rows (K, n) @ (F_1 x ... x F_r): row-major axes (o_1, ..., o_r), each multiplied by
    its factor (X[..., i, ...] F[i, :]) on its own axis."""
    if not mats:
        return rows
    orders = [int(m.shape[0]) for m in mats]
    n = int(np.prod(orders))
    x = b.op("Reshape", rows, b.op("Concat", k, b.ints(orders), axis=0))      # (K, o_1, ..., o_r)
    r = len(orders)
    for a, mat in enumerate(mats):
        perm = [0] + [i for i in range(1, r + 1) if i != a + 1] + [a + 1]       # axis a+1 last
        inv = list(np.argsort(perm))
        f = b.initializer(f"{prefix}{a}", np.ascontiguousarray(mat, dtype=np.float32))
        x = b.op("Transpose", b.op("MatMul", b.op("Transpose", x, perm=perm), f), perm=[int(i) for i in inv])
    return b.op("Reshape", x, b.op("Concat", k, b.ints([n]), axis=0))
