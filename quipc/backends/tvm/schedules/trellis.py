"""Schedules of the "trellis" format's kernels (tir_trellis_linear).

GEMV (decode): part[b, o, c] = sum_C CODE[s(o, 16 C + c)] * z[b, 16 C + c], then trellis_rowsum
t[b, o] = scale[o] sum_c part[b, o, c]. The rule is keyed on trellis_rowsum: one parallel loop
over the rows o; per row the reduction runs tile by tile (C): the tile row's bytes are read
into one or two 64-bit words (trellis_word, scalar), then for every vector b the 16 columns
of the tile are the vector lanes (c): a variable shift of the word gives each state, a table
load its value, into a local (b, 16) accumulator; the row sums follow.

GEMM (prefill): the register-tiled loop nest of tiled_gemm; its producer, one 16-row tile of W'
(K x 16), is decoded per column tile of the product (tiled_gemm's producer handling).
"""
from . import tiled_gemm

ROWS = 8   # rows per parallel iteration (their local buffers are allocated once)

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
    ot, oi = sch.split(o, [None, ROWS])   # m is whole 16-row tiles
    sch.reorder(ot, oi, b)
    sch.parallel(ot)
    sch.compute_at(part, ot)
    loops = sch.get_loops(part)[1:]   # (b, oi, c, g); b elided for one vector
    g, c = loops[-1], loops[-2]
    sch.reorder(loops[-3], g, *([loops[0]] if len(loops) == 4 else []), c)
    # the tile row's words (trellis_word), once per row and column tile, before its 16 lanes
    words = sorted((p for p in sch.get_producers(part)
                    if str(sch.get(p).annotations.get("quipc.op", "")) == "trellis_word"),
                   key=lambda p: sch.get(p).name_hint, reverse=True)   # word1 reads word0
    for w in words:
        sch.compute_at(w, g)
        sch.set_scope(w, 0, "local")
    sch.vectorize(c)
    sch.set_scope(part, 0, "local")
    sch.decompose_reduction(part, g)
    return True


def _gemm(sch, block) -> bool:
    return tiled_gemm.apply(sch, block, producer=_producer(sch, block, "trellis_dequant_tile"))
