"""TVM's own operators in the traced build's prompt functions: rows in parallel, vectorized.

The traced graph keeps the family's norms, rotary embedding, activations and residual adds as
Relax operators, which `LegalizeOps` turns into PrimFuncs with TVM's default loop nest: one
thread, one element at a time. In a decode step they touch one row and cost little, and a
parallel launch per op costs more than it saves (measured: decode slower). Over a prompt they
touch `seq` rows, and SiLU's sigmoid alone took ~15 ms of a 128-row SmolLM2 prefill. So
`schedule_prompt_ops` schedules the legalized PrimFuncs that only the prompt functions call
(forward, prefill): elementwise producers inlined into their consumers (TVM's fast_exp
stages of the SiLU the traced build emits), then each block on its own: the spatial loops
fused and run in parallel, the
innermost split into AVX2 lanes and vectorized when its extent is a static multiple of them;
a reduction (a norm's mean) runs its rows in parallel and its reduction loop serially.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block

from .util import LANES, extent

PROMPT_FUNCTIONS = ("forward", "prefill")


def schedule_prompt_ops(mod, prompt_functions=PROMPT_FUNCTIONS):
    """mod after LegalizeOps -> mod with every unscheduled PrimFunc that only the prompt
    functions call scheduled here."""
    prompt = callees(mod, lambda name: name in prompt_functions)
    others = callees(mod, lambda name: name not in prompt_functions)
    for gv in sorted(prompt - others, key=lambda g: g.name_hint):
        func = mod[gv]
        if func.attrs is not None and func.attrs.get("tir.is_scheduled", False):
            continue
        scheduled = schedule_func(func)
        if scheduled is not None:
            mod[gv] = scheduled.with_attr("tir.is_scheduled", True)
    return mod


def callees(mod, chosen) -> set:
    """The GlobalVars that the module's Relax functions whose names `chosen` accepts call."""
    return set().union(*(called_by(f) for gv, f in mod.functions.items()
                         if not isinstance(f, tirx.PrimFunc) and chosen(gv.name_hint)))


def called_by(func) -> set:
    """The GlobalVars (PrimFuncs, functions) that `func` calls."""
    from tvm import ir, relax

    found = set()

    def visit(expr):
        if isinstance(expr, relax.Call):
            found.update(a for a in expr.args if isinstance(a, ir.GlobalVar))
    relax.analysis.post_order_visit(func, visit)
    return found


def schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """Each top-level block: spatial loops fused in parallel, innermost vectorized; None when a
    block's loop nest is not one loop per block iterator (left to TVM's default)."""
    sch = s_tir.Schedule(func)
    try:
        root = get_root_block(sch)
    except Exception:
        return None
    for block in sch.get_child_blocks(root)[:-1]:   # elementwise producers into their consumers
        try:
            sch.compute_inline(block)
        except Exception:
            pass
    for block in sch.get_child_blocks(root):
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        if not loops or len(loops) != len(iters):
            return None
        if any(extent(sch, loop) == 0 for loop in loops):   # an empty tensor (phi3's split of a
            continue                                          # fused projection): nothing to run
        spatial = [iv.iter_type == tirx.IterVar.DataPar for iv in iters]
        if all(spatial):
            _injective(sch, loops)
        elif spatial[:spatial.index(False)] and not any(spatial[spatial.index(False):]):
            lead = loops[:spatial.index(False)]
            fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
            if extent(sch, fused) != 1:
                sch.parallel(fused)
    return sch.mod["main"]


def _injective(sch: s_tir.Schedule, loops) -> None:
    inner = loops[-1]
    ext = extent(sch, inner)
    if ext is not None and ext % LANES == 0:
        outer, lanes = sch.split(inner, [None, LANES])
        sch.vectorize(lanes)
        loops = [*loops[:-1], outer]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if extent(sch, fused) != 1:
        sch.parallel(fused)
