"""Attention over the in-place KV cache of the hand-written Llama graph (relax_model.py).

cache_k is (layers, kv_heads, head_dim, C), keys transposed so that attention vectorizes over
positions in tiles of TILE; cache_v is (layers, kv_heads, C, head_dim). te_attention reads the
positions [0, extent) of one layer, kv_write_func writes new positions in place.
"""
from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

TILE = 16   # positions of one vector tile: cache capacities and decode spans are multiples of it


def te_attention(q, cache_k, cache_v, pos, layer, extent, spec):
    """Causal attention of q (H, L, D) (row i at position pos[0] + i) over cache positions
    [0, extent): returns (L, H*D). Positions past pos[0] + i are masked out of both the scores
    and the value sum by a select, never by a zero weight: in decode, the positions of the span
    past pos[0] are not written yet and hold whatever the allocation held (0 * NaN = NaN).
    One row with grouped-query heads (decode) computes the heads of a kv head as the rows of one
    register tile (each key and value vector read once for the group); otherwise head by head."""
    H, D, grp = spec.heads, spec.head_dim, spec.heads // spec.kv_heads
    L = q.shape[1]
    nt = extent // TILE
    scale = float(D) ** -0.5
    d = te.reduce_axis((0, D), name="d")
    # the score and value tiles' leading axes (a, b): (kv head, query head of its group) for one
    # row with grouped-query heads, else (head, row); head_row maps (a, b) to (h, i), tile_of back
    grouped = grp > 1 and isinstance(L, tirx.IntImm) and int(L) == 1
    if grouped:
        lead, kv = (spec.kv_heads, grp), (lambda a: a)
        tiled = {"quipc.op": "tiled_gemm", "quipc.axes": "bmtl", "quipc.rows": grp}

        def head_row(a, b):
            return a * grp + b, 0

        def tile_of(h, i):
            return h // grp, h % grp
    else:
        lead, kv = (H, L), (lambda a: a // grp)
        tiled = {"quipc.op": "tiled_gemm", "quipc.axes": "bmtl"}

        def head_row(a, b):
            return a, b

        def tile_of(h, i):
            return h, i
    scores_attrs = {**tiled, "quipc.order": "t_outer"} if grouped else tiled
    s = te.compute((*lead, nt, TILE),
                   lambda a, b, jt, ji: te.sum(q[(*head_row(a, b), d)] * cache_k[layer[0], kv(a), d, jt * TILE + ji],
                                               axis=d),
                   name="attn_scores", attrs=scores_attrs)

    def score(h, i, jt, ji):
        return s[(*tile_of(h, i), jt, ji)]

    def visible(i, jt, ji):
        return jt * TILE + ji <= pos[0] + i

    def masked(h, i, jt, ji):
        return tirx.if_then_else(visible(i, jt, ji), score(h, i, jt, ji) * scale, tirx.min_value("float32"))
    rt = te.reduce_axis((0, nt), name="rt")
    rl = te.reduce_axis((0, TILE), name="rl")
    mx = te.compute((H, L), lambda h, i: te.max(masked(h, i, rt, rl), axis=[rt, rl]), name="attn_max",
                    attrs={"quipc.op": "rowmax"})
    e = te.compute((H, L, nt, TILE), lambda h, i, jt, ji: tirx.exp(masked(h, i, jt, ji) - mx[h, i]),
                   name="attn_exp", attrs={"quipc.op": "elementwise"})
    rt2 = te.reduce_axis((0, nt), name="rt2")
    rl2 = te.reduce_axis((0, TILE), name="rl2")
    sm = te.compute((H, L), lambda h, i: te.sum(e[h, i, rt2, rl2], axis=[rt2, rl2]), name="attn_sum",
                    attrs={"quipc.op": "rowsum"})
    dl = TILE if D % TILE == 0 else D
    jt = te.reduce_axis((0, nt), name="jt")
    ji = te.reduce_axis((0, TILE), name="ji")

    def pv_term(a, b, dt, di):
        h, i = head_row(a, b)
        return tirx.if_then_else(visible(i, jt, ji),
                                 e[h, i, jt, ji] * cache_v[layer[0], kv(a), jt * TILE + ji, dt * dl + di], 0.0)
    o = te.compute((*lead, D // dl, dl), lambda a, b, dt, di: te.sum(pv_term(a, b, dt, di), axis=[jt, ji]),
                   name="attn_pv", attrs=tiled)

    def pv(h, i, dt, di):
        return o[(*tile_of(h, i), dt, di)]
    return te.compute((L, H * D), lambda i, c: pv(c // D, i, (c % D) // dl, c % dl) / sm[c // D, i],
                      name="attn_out", attrs={"quipc.op": "elementwise"})


def kv_write_func(spec):
    """In-place: cache_k[layer, g, d, pos + l] = k[l, g*D + d]; cache_v[layer, g, pos + l, d] = v[...]."""
    G, D, NL = spec.kv_heads, spec.head_dim, spec.layers

    @T.prim_func(s_tir=True)
    def kv_write(var_ck: T.handle, var_cv: T.handle, var_k: T.handle, var_v: T.handle,
                 var_pos: T.handle, var_layer: T.handle):
        T.func_attr({"tirx.noalias": True})
        C = T.int64()
        L = T.int64()
        ck = T.match_buffer(var_ck, (T.int64(NL), T.int64(G), T.int64(D), C))
        cv = T.match_buffer(var_cv, (T.int64(NL), T.int64(G), C, T.int64(D)))
        k = T.match_buffer(var_k, (L, T.int64(G * D)))
        v = T.match_buffer(var_v, (L, T.int64(G * D)))
        pos = T.match_buffer(var_pos, (T.int64(1),), "int64")
        layer = T.match_buffer(var_layer, (T.int64(1),), "int64")
        for l, g, d in T.grid(L, T.int64(G), T.int64(D)):
            with T.sblock("kv_write"):
                vl, vg, vd = T.axis.remap("SSS", [l, g, d])
                ck[layer[0], vg, vd, pos[0] + vl] = k[vl, vg * T.int64(D) + vd]
                cv[layer[0], vg, pos[0] + vl, vd] = v[vl, vg * T.int64(D) + vd]
    return kv_write
