"""Decode-time QuIP matmul: part[b, ot, q, oi] = sum_{kw, kj} code(o, k) * z[b, k], k = kw*32 + kj*4 + q.

Loop nest: parallel over (b, ot); the reduction runs word by word (kw), unrolled over the 32
codes of a word group (kj, q); the 4 partial sums q x the 16 rows of a tile are the vector lanes, accumulated in
registers. The packed words are read once, straight from the parameter (no dequantized copy).
"""

OPS = ("quip_gemv",)


def apply(sch, block) -> bool:
    b, ot, q, oi, kw, kj = sch.get_loops(block)
    sch.reorder(b, ot, kw, kj, q, oi)
    outer = sch.fuse(b, ot)
    sch.parallel(outer)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, outer)
    sch.unroll(kj)
    sch.unroll(q)
    sch.vectorize(sch.get_loops(block)[-1])
    sch.vectorize(sch.get_loops(local)[-1])
    sch.decompose_reduction(block, kw)
    return True
