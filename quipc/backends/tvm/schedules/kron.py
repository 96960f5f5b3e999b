"""One Kronecker-factor stage of an incoherence transform: out[b, k] = sum_r M[.., r] in[b, ..].

Vectorized over k in groups of 8 when the factor's stride keeps each group inside one factor
index (annotation quipc.vec), with the reduction r outside the vector loop and 4 such groups
accumulated side by side (one FMA chain over r alone waited on each FMA's latency); rows in
parallel.
"""
from .util import LANES, extent

OPS = ("kron",)
ACCUMULATORS = 4   # vectors of 8 outputs summed at once (the FMA latency hidden behind 4 chains)


def apply(sch, block) -> bool:
    b, k, r = sch.get_loops(block)
    if extent(sch, b) != 1:
        sch.parallel(b)
    if int(sch.get(block).annotations.get("quipc.vec", 0)) and (extent(sch, k) or 0) % LANES == 0:
        ko, ki = sch.split(k, [None, LANES])
        n_ko = extent(sch, ko) or 1
        acc = next(u for u in (ACCUMULATORS, 2, 1) if n_ko % u == 0)
        if acc > 1:   # `acc` vectors accumulate side by side: independent FMA chains over r
            ko, kacc = sch.split(ko, [None, acc])
            sch.reorder(b, ko, r, kacc, ki)
            sch.unroll(kacc)
        else:
            sch.reorder(b, ko, r, ki)
        sch.vectorize(ki)
        sch.decompose_reduction(block, r)
    return True
