"""Register-tiled matmul for blocks whose spatial axes are annotated by role.

"quipc.axes" names each spatial axis: b (batch, parallel), m (rows: tiled by ROWS and
unrolled), t (column tile), l (lanes: contiguous columns, vectorized); one reduction axis.
Loop nest: parallel(b..., t or m-outer), m-outer, t, k, m-inner (unrolled), l (vector);
the ROWS x lanes accumulator lives in registers. "quipc.order" = "t_outer" puts the column
tile outside the row loop (weights stay hot; used for linear layers), else rows outside.
If the block has a producer annotated "dequant_tile", it is computed per column tile.
"""
from .util import extent

OPS = ("tiled_gemm",)
ROWS = 8


def apply(sch, block, producer=None) -> bool:
    a = sch.get(block).annotations
    axes = str(a["quipc.axes"])
    loops = sch.get_loops(block)
    spatial, red = loops[: len(axes)], loops[len(axes):]
    if len(red) == 2:
        red = [sch.fuse(*red)]
    if len(red) != 1:
        return False
    k = red[0]
    batch = [l for l, c in zip(spatial, axes) if c == "b"]
    m = [l for l, c in zip(spatial, axes) if c == "m"][0]
    t = [l for l, c in zip(spatial, axes) if c == "t"][0]
    lane = [l for l, c in zip(spatial, axes) if c == "l"][0]
    rows = int(a.get("quipc.rows", ROWS))
    m_ext = extent(sch, m)
    if rows > 1 and (m_ext is None or m_ext % rows == 0):
        # a symbolic row count is a multiple of ROW_MULTIPLE by contract (callers pad)
        mo, mi = sch.split(m, [None, rows], disable_predication=m_ext is None)
    else:
        mo, mi = m, None
    t_outer = str(a.get("quipc.order", "")) == "t_outer"
    order = batch + ([t, mo] if t_outer else [mo, t]) + [k] + ([mi] if mi is not None else []) + [lane]
    sch.reorder(*order)
    par = batch + ([t] if t_outer else [mo])
    fused = sch.fuse(*par) if len(par) > 1 else par[0]
    sch.parallel(fused)
    if producer is not None:
        sch.compute_at(producer, fused)
        sch.vectorize(sch.get_loops(producer)[-1])
    # loops now: fused, second, k, [mi], lane; the register tile hangs under `second`
    loops = sch.get_loops(block)
    pos = 0
    second, k_loop = loops[pos + 1], loops[pos + 2]
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, second)
    if mi is not None:
        sch.unroll(sch.get_loops(block)[-2])
        sch.unroll(sch.get_loops(local)[-2])
    sch.vectorize(sch.get_loops(block)[-1])
    sch.vectorize(sch.get_loops(local)[-1])
    sch.decompose_reduction(block, k_loop)
    return True
