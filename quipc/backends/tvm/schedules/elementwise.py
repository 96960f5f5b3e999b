"""Fallback for injective stages: rows in parallel, the innermost loop vectorized."""
from .util import LANES, extent

OPS = ("elementwise", "copy")


def apply(sch, block) -> bool:
    loops = sch.get_loops(block)
    if not loops:
        return True
    inner = loops[-1]
    ext = extent(sch, inner)
    if ext is not None and ext % LANES == 0 and ext > LANES:
        _, vi = sch.split(inner, [None, LANES])
        sch.vectorize(vi)
    elif ext is not None and 1 < ext <= 64:
        sch.vectorize(inner)
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        if extent(sch, outer) != 1:
            sch.parallel(outer)
    elif ext is None or ext > 4096:
        pass
    return True
