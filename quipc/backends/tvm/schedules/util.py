"""Small helpers shared by the schedule rules."""
from __future__ import annotations

from tvm import s_tir, tirx

LANES = 8  # float32 lanes of one AVX2 register


def extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def ann(sch, block, key, default=None):
    a = sch.get(block).annotations
    return a[key] if key in a else default


def vectorize_inner(sch: s_tir.Schedule, block, lanes_max: int = 64) -> None:
    """Vectorize the innermost loop of a block when its extent is a known small constant."""
    loops = sch.get_loops(block)
    if not loops:
        return
    ext = extent(sch, loops[-1])
    if ext is not None and 1 < ext <= lanes_max:
        sch.vectorize(loops[-1])


def parallel_outer(sch: s_tir.Schedule, block, spatial: int) -> None:
    """Fuse the first `spatial` loops of a block and run them in parallel."""
    loops = sch.get_loops(block)[:spatial]
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = extent(sch, fused)
    if ext is None or ext > 1:
        sch.parallel(fused)
