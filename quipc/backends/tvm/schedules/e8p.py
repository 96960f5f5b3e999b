"""Schedules of the "e8p" format's kernels (tir_e8p_linear).

GEMV (decode), one block per code stage s, part_s[b, ot, r, c] = sum_g E_s(idx_s[ot, g, r])[c]
* z[b, 8g + c], then e8p_rowsum t[b, ot, r] = sum_s scale[s, o] sum_c part_s[b, ot, r, c]. The
rule is keyed on e8p_rowsum and puts every stage under one parallel loop over (b, ot): per
stage the reduction runs group by group (g), unrolled over the ROWS rows of the tile (r), the 8
coordinates of a group are the vector lanes (c), the ROWS x 8 accumulator in registers (a local
buffer); per group and row: one index load, two byte extractions, three table-row loads (L1),
two FMAs. The row sums follow in the same tile loop.

GEMM (prefill), acc[b, ot, oi] = sum_k wdq[ot, k, oi] * z[b, k]: the register-tiled loop nest
of tiled_gemm (column tile outermost, in parallel); its producer wdq (one 16-row tile of W', a
K x 16 local buffer) is computed per tile, decoded 8 coordinates at a time (vector lanes c).
"""
from . import tiled_gemm

OPS = ("e8p_rowsum", "e8p_gemm")


def apply(sch, block) -> bool:
    op = str(sch.get(block).annotations["quipc.op"])
    return _gemv(sch, block) if op == "e8p_rowsum" else _gemm(sch, block)


def _producers(sch, block, op: str) -> list:
    return [p for p in sch.get_producers(block) if str(sch.get(p).annotations.get("quipc.op", "")) == op]


def _gemv(sch, rowsum) -> bool:
    stages = sorted(_producers(sch, rowsum, "e8p_gemv"), key=lambda p: sch.get(p).name_hint)
    shifts = sorted(_producers(sch, rowsum, "e8p_shift"), key=lambda p: sch.get(p).name_hint)
    if not stages:
        return False
    b, ot, r = sch.get_loops(rowsum)
    outer = sch.fuse(b, ot)
    sch.parallel(outer)
    sch.unroll(r)
    for stage in stages:
        sch.compute_at(stage, outer)
        r, c, g = sch.get_loops(stage)[1:]
        sch.reorder(g, r, c)
        sch.unroll(r)
        sch.vectorize(c)
        sch.set_scope(stage, 0, "local")
        sch.decompose_reduction(stage, g)
    for shift in shifts:   # the ROWS rows of a tile as the vector lanes
        sch.compute_at(shift, outer)
        r, g = sch.get_loops(shift)[1:]
        sch.reorder(g, r)
        sch.vectorize(r)
        sch.set_scope(shift, 0, "local")
        sch.decompose_reduction(shift, g)
    return True


def _gemm(sch, block) -> bool:
    producers = _producers(sch, block, "e8p_dequant_tile")
    if not tiled_gemm.apply(sch, block):
        return False
    if producers:
        wdq = producers[0]
        sch.compute_at(wdq, sch.get_loops(block)[0])
        k, oi = sch.get_loops(wdq)[-2:]
        g, c = sch.split(k, [None, 8])
        sch.reorder(g, oi, c)
        sch.vectorize(c)
    return True
