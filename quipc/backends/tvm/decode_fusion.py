"""The traced build's decode step with TVM's own operators fused (Relax FuseOps + FuseTIR).

The traced graph keeps the family's norms, rotary embedding, activations and residual adds as
Relax operators; `LegalizeOps` gives each its own PrimFunc, and TVM's CPU build pipeline
(`tvm.compile`'s default) does not fuse them. In a decode step each is a VM call, an output
allocation and a release around a few hundred flops: an RMSNorm was five calls (mean, add,
rsqrt, two multiplies), a rotary embedding of q or k ten, ~5,100 VM instructions per SmolLM2
token. `fuse_decode_ops` groups them as TVM's fusion rules allow (injective chains, a
reduction with its elementwise consumers), in the decode function only:

- the PrimFuncs a prompt function (forward, prefill) calls are left out (marked opaque): those
  get the parallel schedules of `schedules/legalized.py` one by one, and FuseTIR renaming a
  symbolic-shape group of theirs fails inside TVM (RenewDefs: "VarRemapGet(source) ==
  nullptr");
- quipc's own kernels (already scheduled: the quantized linears, attention, the cache write,
  the embedding) are left out too, so their schedules stay as built.

Decode's fused functions stay single-threaded, as its legalized ones were (one row: a parallel
launch per op costs more than it saves).
"""
from __future__ import annotations

from .schedules.legalized import PROMPT_FUNCTIONS, callees

OPAQUE = 8   # relax's OpPatternKind.kOpaque: FuseOps never groups the function with another


def fuse_decode_ops(mod, prompt_functions=PROMPT_FUNCTIONS):
    """mod after LegalizeOps -> mod whose non-prompt functions call fused PrimFuncs."""
    from tvm import relax, tirx

    mod = relax.transform.AnnotateTIROpPattern()(mod)
    prompt = callees(mod, lambda name: name in prompt_functions)
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        scheduled = func.attrs is not None and bool(func.attrs.get("tir.is_scheduled", False))
        if scheduled or gv in prompt:
            mod[gv] = func.with_attr("op_pattern", OPAQUE)
    mod = relax.transform.FuseOps()(mod)
    return relax.transform.FuseTIR()(mod)
