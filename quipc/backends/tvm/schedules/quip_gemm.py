"""Prefill-time QuIP matmul: acc[b, ot, oi] = sum_k wdq[ot, k, oi] * z[b, k].

wdq, the float codes of one 16-row tile, is computed per tile inside the parallel tile loop
(a K x 16 local buffer, never the whole matrix) and reused by all rows; the matmul itself is
the register-tiled loop nest of tiled_gemm with the column tile outermost.
"""
from . import tiled_gemm

OPS = ("quip_gemm",)


def apply(sch, block) -> bool:
    producers = [p for p in sch.get_producers(block)
                 if str(sch.get(p).annotations.get("quipc.op", "")) == "dequant_tile"]
    sch.annotate(block, "quipc.axes", "mtl")
    sch.annotate(block, "quipc.order", "t_outer")
    return tiled_gemm.apply(sch, block, producer=producers[0] if producers else None)
