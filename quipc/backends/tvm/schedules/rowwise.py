"""Row reductions (sum, max): rows in parallel, the reduction serial."""
from .util import extent

OPS = ("rowsum", "rowmax")


def apply(sch, block) -> bool:
    loops = sch.get_loops(block)
    n_sp = len(sch.get(block).iter_vars) - sum(
        1 for iv in sch.get(block).iter_vars if iv.iter_type == 2)
    if n_sp >= 1:
        sp = loops[:n_sp]
        fused = sch.fuse(*sp) if len(sp) > 1 else sp[0]
        if extent(sch, fused) != 1:
            sch.parallel(fused)
    return True
