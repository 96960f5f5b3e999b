"""torch.ops.quipc.attention in the traced TVM build: one PrimFunc per layer's attention.

Traced eagerly, a layer's attention is a dozen Relax ops that copy the whole cache several
times per token (kv heads repeated for the query heads, keys transposed, both materialized)
before two unscheduled matmuls. Here each query row reads the cache in place (query head h
reads kv head h // group) and is computed start to end in one parallel loop over (batch,
head, row): scores as 8-lane partial dot products (contiguous key loads, vectorized), the
logits (scaling, soft-capping, additive mask: computed once per score), a max, exp and sum,
and the value sum streaming rows of V into a vectorized head_dim accumulator.

    q (B, H, S, D), k / v (B, KV, L, D), mask broadcastable to (B, H, S, L) or absent
        -> (B, S, H, D)
With a `span` (the capacity cache of traced_cache.py), k / v are (B, KV, C, D) buffers of
which the first L = len(span) positions are attended.
"""
from __future__ import annotations

from tvm import s_tir, te, tirx

from .schedules.util import LANES, extent

BLOCKS = ("attn_qk_part", "attn_qk", "attn_logit", "attn_max", "attn_exp", "attn_sum", "attn_pv")


def _index(dim, i):
    """i, or 0 along a dimension the mask broadcasts (a static 1)."""
    return 0 if isinstance(dim, (int, tirx.IntImm)) and int(dim) == 1 else i


def te_attention(q, k, v, mask, scaling: float, softcap: float, span=None):
    B, H, S, D = q.shape
    KV, Dv = k.shape[1], v.shape[3]
    L = k.shape[2] if span is None else span.shape[0]
    group = int(H) // int(KV)
    lanes = LANES if int(D) % LANES == 0 else 1
    dt = te.reduce_axis((0, int(D) // lanes), name="dt")
    part = te.compute((B, H, S, L, lanes),
                      lambda b, h, s, j, c: te.sum(q[b, h, s, dt * lanes + c] * k[b, h // group, j, dt * lanes + c],
                                                   axis=dt), name="attn_qk_part")
    c = te.reduce_axis((0, lanes), name="c")
    qk = te.compute((B, H, S, L), lambda b, h, s, j: te.sum(part[b, h, s, j, c], axis=c), name="attn_qk")

    def logit(b, h, s, j):
        x = qk[b, h, s, j] * tirx.const(scaling, "float32")
        if softcap:
            cap = tirx.const(softcap, "float32")
            x = tirx.tanh(x / cap) * cap
        if mask is not None:
            mb, mh, ms, _ = mask.shape
            x = x + mask[_index(mb, b), _index(mh, h), _index(ms, s), j]
        return x
    lg = te.compute((B, H, S, L), logit, name="attn_logit")   # once: the max and the exp read it
    jm = te.reduce_axis((0, L), name="jm")
    mx = te.compute((B, H, S), lambda b, h, s: te.max(lg[b, h, s, jm], axis=jm), name="attn_max")
    e = te.compute((B, H, S, L), lambda b, h, s, j: tirx.exp(lg[b, h, s, j] - mx[b, h, s]), name="attn_exp")
    js = te.reduce_axis((0, L), name="js")
    sm = te.compute((B, H, S), lambda b, h, s: te.sum(e[b, h, s, js], axis=js), name="attn_sum")
    jv = te.reduce_axis((0, L), name="jv")
    pv = te.compute((B, H, S, Dv), lambda b, h, s, d: te.sum(e[b, h, s, jv] * v[b, h // group, jv, d], axis=jv),
                    name="attn_pv")
    return te.compute((B, S, H, Dv), lambda b, s, h, d: pv[b, h, s, d] / sm[b, h, s], name="attn_out")


def schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One parallel loop over (batch, row, head) of the output; every stage computed under it."""
    sch = s_tir.Schedule(func)
    out = sch.get_sblock("attn_out")
    b, s, h, d = sch.get_loops(out)
    rows = sch.fuse(b, s, h)
    sch.parallel(rows)
    _vector(sch, d)
    for name in reversed(BLOCKS):
        sch.compute_at(sch.get_sblock(name), rows, preserve_unit_loops=True)
    # partial dot products: the 8 lanes innermost (contiguous keys), under the head_dim tiles
    part = sch.get_sblock("attn_qk_part")
    *_, j, lane, dt = sch.get_loops(part)
    sch.reorder(dt, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(part, dt)
    # the value sum: rows of V streamed into a vectorized head_dim accumulator
    pv = sch.get_sblock("attn_pv")
    *_, dv, jv = sch.get_loops(pv)
    sch.reorder(jv, dv)
    _vector(sch, dv)
    sch.decompose_reduction(pv, jv)
    _vector(sch, sch.get_loops(sch.get_sblock("attn_logit"))[-1])
    _vector(sch, sch.get_loops(sch.get_sblock("attn_exp"))[-1])
    return sch.mod["main"]


def _vector(sch: s_tir.Schedule, loop) -> None:
    ext = extent(sch, loop)
    if ext is None or ext > LANES:
        _, loop = sch.split(loop, [None, LANES])
    if ext is None or ext > 1:
        sch.vectorize(loop)


def emit(bb, q, k, v, mask, scaling: float, softcap: float, name: str, span=None):
    """The attention of one layer: a call_tir of its PrimFunc, scheduled here (emit_te gives each
    layer a PrimFunc of its own; one handed back again, already scheduled, is left as it is).
    span: k / v are capacity buffers of which len(span) positions are attended."""
    args = [q, k, v] + ([mask] if mask is not None else []) + ([span] if span is not None else [])
    has_mask = mask is not None

    def fn(q_, k_, v_, *rest):
        m = rest[0] if has_mask else None
        s = rest[-1] if span is not None else None
        return te_attention(q_, k_, v_, m, scaling, softcap, s)
    out = bb.emit_te(fn, *args, primfunc_name_hint=name)
    call = bb.lookup_binding(out)
    gv = call.args[0]
    func = bb.get()[gv]
    if not (func.attrs is not None and func.attrs.get("tir.is_scheduled", False)):
        bb.update_func(gv, schedule(func).with_attr("tir.is_scheduled", True))
    return out
