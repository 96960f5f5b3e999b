"""One Kronecker-factor stage of an incoherence transform: out[b, k] = sum_r M[.., r] in[b, ..].

Vectorized over k in groups of 8 when the factor's stride keeps each group inside one factor
index (annotation quipc.vec), with the reduction r outside the vector loop; rows in parallel.
"""
from .util import LANES, extent

OPS = ("kron",)


def apply(sch, block) -> bool:
    b, k, r = sch.get_loops(block)
    if extent(sch, b) != 1:
        sch.parallel(b)
    if int(sch.get(block).annotations.get("quipc.vec", 0)) and (extent(sch, k) or 0) % LANES == 0:
        ko, ki = sch.split(k, [None, LANES])
        sch.reorder(b, ko, r, ki)
        sch.vectorize(ki)
        sch.decompose_reduction(block, r)
    return True
