"""CPU schedules for the PrimFuncs the TVM backend generates, one rule per file.

Every TE stage quipc emits carries a block annotation "quipc.op" naming its kind. The driver
walks the blocks of a PrimFunc and asks each rule, in RULES order, to schedule a block; the
first rule that accepts it wins (like tvm.s_tir.dlight, but keyed on quipc's own ops, which
lets a rule use what it knows about the op, e.g. the packed-code layout). A block that no rule
takes keeps TVM's default (serial) loop nest, which is correct, only slow.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block

from . import e8p, elementwise, inline, kron, quip_gemm, quip_gemv, rowwise, tiled_gemm, trellis

# order matters: inlining first (it removes blocks), then the specific rules, then fallbacks
RULES = [inline, quip_gemv, quip_gemm, e8p, trellis, tiled_gemm, kron, rowwise, elementwise]


def op_of(sch: s_tir.Schedule, block) -> str | None:
    ann = sch.get(block).annotations
    return str(ann["quipc.op"]) if "quipc.op" in ann else None


def block_names(sch: s_tir.Schedule) -> list[str]:
    root = get_root_block(sch)
    return [sch.get(b).name_hint for b in sch.get_child_blocks(root)]


def schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    for rule in RULES:
        for name in block_names(sch):
            try:
                block = sch.get_sblock(name)
            except Exception:  # removed by an earlier rule (inlined, computed at)
                continue
            if rule.OPS and op_of(sch, block) in rule.OPS and not _done(sch, block):
                if rule.apply(sch, block):
                    _mark(sch, name)
    return sch.mod["main"]


def _done(sch, block) -> bool:
    return "quipc.scheduled" in sch.get(block).annotations


def _mark(sch, name: str) -> None:
    try:
        sch.annotate(sch.get_sblock(name), "quipc.scheduled", 1)
    except Exception:  # the rule inlined it
        pass


def schedule_module(mod):
    """Schedule every PrimFunc of an IRModule that quipc generated (CPU targets)."""
    from tvm import IRModule

    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not func.attrs.get("quipc.no_schedule", False) \
                if func.attrs is not None else isinstance(func, tirx.PrimFunc):
            out[gv] = schedule_func(func).with_attr("global_symbol", gv.name_hint)
    for gv, func in out.items():
        mod[gv] = func
    return mod
