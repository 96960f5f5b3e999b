"""Schedules of the "trellis" format's kernels (tir_trellis_linear).

GEMV (decode): part[b, o, c] = sum_C CODE[s(o, 16 C + c)] * z[b, 16 C + c], then trellis_rowsum
t[b, o] = scale[o] sum_c part[b, o, c]. The rule is keyed on trellis_rowsum: one parallel loop
over (b, o) in tiles of 8 rows; per row the reduction runs tile by tile (C) with the 16
columns of a tile as the vector lanes (c) in a local accumulator, then the row sum.

GEMM (prefill): the register-tiled loop nest of tiled_gemm; its producer, one 16-row tile of W'
(K x 16), is decoded per column tile of the product (tiled_gemm's producer handling).
"""
from . import tiled_gemm

OPS = ("trellis_rowsum", "trellis_gemm")


def apply(sch, block) -> bool:
    op = str(sch.get(block).annotations["quipc.op"])
    return _gemv(sch, block) if op == "trellis_rowsum" else _gemm(sch, block)


def _producer(sch, block, op: str):
    found = [p for p in sch.get_producers(block) if str(sch.get(p).annotations.get("quipc.op", "")) == op]
    return found[0] if found else None


def _gemv(sch, rowsum) -> bool:
    part = _producer(sch, rowsum, "trellis_gemv")
    if part is None:
        return False
    b, o = sch.get_loops(rowsum)
    outer = sch.fuse(b, o)
    sch.parallel(outer)
    sch.compute_at(part, outer)
    c, g = sch.get_loops(part)[-2:]
    sch.reorder(g, c)
    sch.vectorize(c)
    sch.set_scope(part, 0, "local")
    sch.decompose_reduction(part, g)
    return True


def _gemm(sch, block) -> bool:
    return tiled_gemm.apply(sch, block, producer=_producer(sch, block, "trellis_dequant_tile"))
