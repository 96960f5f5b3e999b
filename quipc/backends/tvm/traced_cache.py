"""torch.ops.quipc.kv_write in the traced TVM build: the capacity cache written in place.

Captured with `cache="capacity"` (backends/traced/capture.py), each layer's update of its key
and value cache is one kv_write(cache (B, KV, C, D), new (B, KV, T, D), span (S,)), whose
torch meaning is "the first S positions of the cache, `new` at [S - T, S)". Here it is a
call_tir_inplace that writes the T new positions into the cache buffer and hands back the
buffer itself (capacity C): a decode step copies one position per layer and kind instead of
the whole cache (concatenated, the cache was copied into fresh memory on every call). The
attention that reads it (traced_attention.py) takes S from the span, so positions past S,
never written, are never read.
"""
from __future__ import annotations

from tvm.script import tirx as T


def kv_write_func(kv_heads: int, head_dim: int):
    """In place: cache[b, h, S - T + t, d] = new[b, h, t, d]."""
    G, D = kv_heads, head_dim

    @T.prim_func(s_tir=True)
    def kv_write(var_cache: T.handle, var_new: T.handle, var_span: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        C = T.int64()
        L = T.int64()
        S = T.int64()
        cache = T.match_buffer(var_cache, (B, T.int64(G), C, T.int64(D)))
        new = T.match_buffer(var_new, (B, T.int64(G), L, T.int64(D)))
        T.match_buffer(var_span, (S,), "int64")
        for b, g, t, d in T.grid(B, T.int64(G), L, T.int64(D)):
            with T.sblock("kv_write"):
                vb, vg, vt, vd = T.axis.remap("SSSS", [b, g, t, d])
                cache[vb, vg, S - L + vt, vd] = new[vb, vg, vt, vd]
    return kv_write


class CapacityCache:
    """The converter of kv_write for one Relax module: one PrimFunc per (kv heads, head dim),
    and, for each buffer it hands back, the span whose length the attention reads."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.funcs: dict = {}
        self.spans: dict = {}

    def emit(self, bb, cache, new, span):
        from tvm import relax

        _, g, _, d = (int(x) if i in (1, 3) else x for i, x in enumerate(cache.ty.shape))
        key = (g, d)
        if key not in self.funcs:
            func = kv_write_func(g, d).with_attr("global_symbol", f"{self.prefix}kv_write_{g}x{d}")
            self.funcs[key] = bb.add_func(func, f"{self.prefix}kv_write_{g}x{d}")
        out = bb.emit(relax.call_tir_inplace(self.funcs[key], [cache, new, span], [0],
                                             relax.TensorType(cache.ty.shape, "float32")))
        self.spans[id(out)] = (out, span)
        return out

    def span_of(self, var):
        """The span tensor of a buffer kv_write handed back, or None for any other tensor."""
        hit = self.spans.get(id(var))
        return hit[1] if hit is not None and hit[0].same_as(var) else None
