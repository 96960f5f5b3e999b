"""The whole Llama-family model as a Relax module, with a KV cache updated in place.

Functions (all take the parameter tuple last, an object the VM does not check: the runtime checks
it against tvm_config.json's param_types once, at load; caches are updated in place and returned):
    prefill_all(ids (L,), cache_k, cache_v, params) -> (logits (L, V), cache_k, cache_v)
    prefill(ids (L,), last (1,), cache_k, cache_v, params) -> (logits (1, V) of row `last`, ...)
    decode(ids (1,), pos (1,), span (shape [S]), cache_k, cache_v, params) -> (logits (1, V), ...)
with cache_k (layers, kv_heads, head_dim, C) (keys transposed: attention vectorizes over
positions), cache_v (layers, kv_heads, C, head_dim). Contract with the caller (the runtime):
L and C are multiples of 16 (prompts padded at the end; causal attention keeps padding out of
real rows), prefill writes positions [0, L), decode writes `pos` and attends to [0, pos] (its loops
run over [0, S), S = pos + 1 rounded up to 16: decode time grows with the position, not with C); cache
positions not written yet (past `pos`) may hold anything, NaN included (the runtime allocates
caches uninitialized): attention reads them but they never reach a result.

Every stage is a TE computation tagged with "quipc.op" for the schedule rules; the quantized
linears are fused decode-matmul kernels, built by the lowering of each layer's code format
(lowering.py: tir_quip_linear for "grid", tir_e8p_linear for "e8p"; one PrimFunc per distinct
layer shape and format)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, te, tirx

from . import gemv_i8, row_patch
from . import tir_quip_linear as Q
from .attention import kv_write_func, te_attention
from .embedding import embed_param_names, embed_params, te_head_embed
from .lowering import lowering

LANES = 16


@dataclass(frozen=True)
class LlamaSpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_pos: int
    tied: bool

    @property
    def vocab_pad(self) -> int:
        return -(-self.vocab // LANES) * LANES

    @staticmethod
    def from_config(cfg: dict) -> "LlamaSpec":
        if cfg.get("model_type") != "llama":
            raise ValueError(f"the TVM backend supports Llama models, not {cfg.get('model_type')!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.get('hidden_act')!r} (TVM backend: silu)")
        heads = int(cfg["num_attention_heads"])
        hd = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        return LlamaSpec(int(cfg["hidden_size"]), int(cfg["intermediate_size"]),
                         int(cfg["num_hidden_layers"]), heads,
                         int(cfg.get("num_key_value_heads") or heads), hd, int(cfg["vocab_size"]),
                         float(cfg.get("rms_norm_eps", 1e-6)), int(cfg.get("max_position_embeddings", 2048)),
                         bool(cfg.get("tie_word_embeddings", False)))


# --- TE building blocks ----------------------------------------------------------------
def te_embed(ids, table):
    """x[b, k] = E[id, k] with E stored tiled as (V/16, K, 16)."""
    k_dim = table.shape[1]
    return te.compute((ids.shape[0], k_dim),
                      lambda b, k: table[ids[b] // LANES, k, ids[b] % LANES],
                      name="embed", attrs={"quipc.op": "elementwise"})


def te_rmsnorm(x, w, eps: float):
    n = x.shape[1]
    k = te.reduce_axis((0, n), name="k")
    ss = te.compute((x.shape[0],), lambda b: te.sum(x[b, k] * x[b, k], axis=k), name="rms_ss",
                    attrs={"quipc.op": "rowsum"})
    return te.compute(x.shape, lambda b, j: w[j] * (x[b, j] * tirx.rsqrt(ss[b] / float(int(n)) + eps)),
                      name="rms_out", attrs={"quipc.op": "elementwise"})


def te_rope(x, cos, sin, pos, heads: int, hd: int, head_major: bool):
    """Rotary embedding of x (L, heads*hd) at positions pos[0] + row; output (heads, L, hd) when
    head_major, else (L, heads*hd)."""
    half = hd // 2

    def val(i, h, d):
        p = pos[0] + i
        base = h * hd
        rot = tirx.if_then_else(d < half, -x[i, base + tirx.min(d + half, hd - 1)],
                                x[i, base + tirx.max(d - half, 0)])
        return x[i, base + d] * cos[p, d] + rot * sin[p, d]
    if head_major:
        return te.compute((heads, x.shape[0], hd), lambda h, i, d: val(i, h, d), name="rope_q",
                          attrs={"quipc.op": "elementwise"})
    return te.compute(x.shape, lambda i, j: val(i, j // hd, j % hd), name="rope_k",
                      attrs={"quipc.op": "elementwise"})


def te_silu_mul(g, u):
    return te.compute(g.shape, lambda b, j: g[b, j] * tirx.sigmoid(g[b, j]) * u[b, j], name="silu_mul",
                      attrs={"quipc.op": "elementwise"})


def te_lm_head(x, w):
    """logits (L, V_pad) = x @ W^T with W stored tiled as (V_pad/16, K, 16)."""
    k = te.reduce_axis((0, w.shape[1]), name="k")
    lg = te.compute((x.shape[0], w.shape[0], LANES), lambda b, vt, vi: te.sum(x[b, k] * w[vt, k, vi], axis=k),
                    name="lm_head", attrs={"quipc.op": "tiled_gemm", "quipc.axes": "mtl", "quipc.order": "t_outer"})
    return lg


def te_take_row(x, idx):
    return te.compute((1, x.shape[1]), lambda b, k: x[idx[0], k], name="take_row",
                      attrs={"quipc.op": "elementwise"})


# --- parameters ------------------------------------------------------------------------
def tile_rows(w: np.ndarray) -> np.ndarray:
    """(V, K) -> (V_pad/16, K, 16), rows zero-padded: the layout of embedding / lm_head."""
    v, k = w.shape
    vp = -(-v // LANES) * LANES
    full = np.zeros((vp, k), np.float32)
    full[:v] = w
    return np.ascontiguousarray(full.reshape(vp // LANES, LANES, k).transpose(0, 2, 1))


def rope_tables(cfg: dict, spec: LlamaSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_pos, head_dim) computed by transformers' own rotary module."""
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    c = dict(cfg)
    config = AutoConfig.for_model(c.pop("model_type"), **c)
    rot = LlamaRotaryEmbedding(config)
    # rows past max_pos exist only as padding (prompts padded to 16, caches rounded up): cover them
    pos = torch.arange(-(-spec.max_pos // LANES) * LANES + LANES)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].numpy().astype(np.float32), sin[0].numpy().astype(np.float32)


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class ModelBuilder:
    """Collects parameters (name -> array) and builds the Relax functions over them."""

    def __init__(self, cfg: dict, layers: dict, dense: dict, prefix: str = "model.layers",
                 embed_from_head: bool = False, int8_activations: bool = False):
        """embed_from_head: the embedding decodes from the quantized lm_head's params
        (embedding.py) instead of a dense table in `dense`. int8_activations: decode's 4-bit
        GEMVs on int8 activations (gemv_i8.py; the caller checks the target)."""
        self.cfg, self.spec = cfg, LlamaSpec.from_config(cfg)
        self.int8 = int8_activations
        self.layers, self.dense, self.prefix = layers, dense, prefix
        self.embed_from_head = embed_from_head
        self.names: list[str] = []
        self.arrays: list[np.ndarray] = []
        self.index: dict[str, int] = {}
        self.linear_specs: dict[str, Q.LinearSpec] = {}
        self._collect()

    def _add(self, name: str, arr: np.ndarray) -> None:
        self.index[name] = len(self.names)
        self.names.append(name)
        self.arrays.append(np.ascontiguousarray(arr))

    def _dense(self, key: str) -> np.ndarray:
        if key not in self.dense:
            raise ValueError(f"artifact lacks the dense tensor {key}")
        return self.dense[key].float().numpy() if hasattr(self.dense[key], "numpy") else np.asarray(self.dense[key], np.float32)

    def _collect(self) -> None:
        sp = self.spec
        if not self.embed_from_head:  # else the head's codes are the table (embedding.py)
            self._add("embed", tile_rows(self._dense("model.embed_tokens.weight")))
        if "lm_head" in self.layers:  # quantized lm_head: one more QuIP linear (vocab x hidden)
            self._add_linear("lm_head", self.layers["lm_head"])
            if self.embed_from_head:
                for key, arr in embed_params(self.layers["lm_head"], self.linear_specs["lm_head"]).items():
                    self._add(key, arr)
        elif not sp.tied:
            self._add("lm_head", tile_rows(self._dense("lm_head.weight")))
        cos, sin = rope_tables(self.cfg, sp)
        self._add("rope_cos", cos)
        self._add("rope_sin", sin)
        self._add("norm", self._dense("model.norm.weight"))
        for i in range(sp.layers):
            p = f"{self.prefix}.{i}"
            self._add(f"{p}.input_layernorm", self._dense(f"{p}.input_layernorm.weight"))
            self._add(f"{p}.post_attention_layernorm", self._dense(f"{p}.post_attention_layernorm.weight"))
            for lin in LINEARS:
                name = f"{p}.{lin}"
                if name not in self.layers:
                    raise ValueError(f"the TVM backend needs every block linear quantized; {name} is not")
                self._add_linear(name, self.layers[name])

    def _add_linear(self, name: str, layer) -> None:
        spec = Q.LinearSpec.of(layer)
        self.linear_specs[name] = spec
        low = lowering(spec.format)
        for key, arr in low.linear_params(layer, spec).items():
            gname = self._param_name(low, spec.format, name, key)
            if gname not in self.index:  # a SHARED array (codebook table) is stored once
                self._add(gname, arr)
        if layer.has_row_patch:
            for key, arr in row_patch.params(layer, name).items():
                self._add(key, arr)

    @staticmethod
    def _param_name(low, fmt: str, name: str, key: str) -> str:
        """A layer's array name; a SHARED one (a format's codebook table) is named by the format."""
        return f"{fmt}.{key}" if key in low.SHARED else f"{name}.{key}"

    # --- relax -----------------------------------------------------------------------
    def param_types(self):
        return [relax.TensorType(a.shape, str(a.dtype)) for a in self.arrays]

    def build(self):
        bb = relax.BlockBuilder()
        self._kv_gv = bb.add_func(kv_write_func(self.spec), "kv_write")
        for fname in ("prefill_all", "prefill", "decode"):
            self._function(bb, fname)
        return bb.get()

    def _function(self, bb, fname: str) -> None:
        sp = self.spec
        L = tirx.Var("L", "int64")
        C = tirx.Var("C", "int64")
        rows = 1 if fname == "decode" else L
        ids = relax.Var("ids", relax.TensorType((rows,), "int32"))
        args = [ids]
        pos = last = None
        if fname == "prefill":
            last = relax.Var("last", relax.TensorType((1,), "int64"))
            args.append(last)
        span = None
        if fname == "decode":
            pos = relax.Var("pos", relax.TensorType((1,), "int64"))
            # the attended extent: pos + 1 rounded up to 16 (a multiple of 16, <= C), a shape
            # argument so that the attention loops run to it and not to the cache's capacity
            span = tirx.Var("span", "int64")
            args += [pos, relax.Var("span", relax.ShapeType([span]))]
        ck = relax.Var("cache_k", relax.TensorType((sp.layers, sp.kv_heads, sp.head_dim, C), "float32"))
        cv = relax.Var("cache_v", relax.TensorType((sp.layers, sp.kv_heads, C, sp.head_dim), "float32"))
        # the parameter tuple is an opaque object to the VM: typed as a tuple, the VM would check
        # every one of its ~1,600 tensors on each call (0.5 ms of a decode step); the runtime
        # checks the tuple once when it loads the build (tvm_config.json's param_types)
        params = relax.Var("params", relax.ObjectType())
        types = self.param_types()
        args += [ck, cv, params]
        mode = "gemv" if fname == "decode" else "gemm"
        with bb.function(fname, args):
            got: dict[str, relax.Var] = {}

            def P(name):
                if name not in got:
                    i = self.index[name]
                    got[name] = bb.emit(relax.call_pure_packed("vm.builtin.tuple_getitem", params,
                                                               relax.prim_value(i), ty_args=types[i]))
                return got[name]
            if pos is None:
                pos = bb.emit(relax.const(np.zeros(1, np.int64), "int64"))
            h = self._embed(bb, P, ids)

            def rms(x, w):
                return te_rmsnorm(x, w, sp.eps)

            def rope_q(x, c, s_, p_):
                return te_rope(x, c, s_, p_, sp.heads, sp.head_dim, True)

            def rope_k(x, c, s_, p_):
                return te_rope(x, c, s_, p_, sp.kv_heads, sp.head_dim, False)

            def attn(q_, k_, v_, p_, l_, *span_):
                # emit_te gives each PrimFunc its own shape variables: prefill attends to the
                # prompt's rows (q's), decode to the span it is passed (a PrimFunc argument)
                ext = span_[0] if span_ else q_.shape[1]
                return te_attention(q_, k_, v_, p_, l_, ext, sp)
            for i in range(sp.layers):
                p = f"{self.prefix}.{i}"
                layer_c = relax.const(np.array([i], np.int64), "int64")
                xn = bb.emit_te(rms, h, P(f"{p}.input_layernorm"), primfunc_name_hint="rmsnorm")
                q = self._linear(bb, P, f"{p}.self_attn.q_proj", xn, mode)
                k = self._linear(bb, P, f"{p}.self_attn.k_proj", xn, mode)
                v = self._linear(bb, P, f"{p}.self_attn.v_proj", xn, mode)
                qr = bb.emit_te(rope_q, q, P("rope_cos"), P("rope_sin"), pos, primfunc_name_hint="rope_q")
                kr = bb.emit_te(rope_k, k, P("rope_cos"), P("rope_sin"), pos, primfunc_name_hint="rope_k")
                kv = bb.emit(relax.call_tir_inplace(
                    self._kv_gv, [ck, cv, kr, v, pos, layer_c], [0, 1],
                    [ck.struct_info if hasattr(ck, "struct_info") else relax.TensorType(
                        (sp.layers, sp.kv_heads, sp.head_dim, C), "float32"),
                     relax.TensorType((sp.layers, sp.kv_heads, C, sp.head_dim), "float32")]))
                ck = bb.emit(relax.TupleGetItem(kv, 0))
                cv = bb.emit(relax.TupleGetItem(kv, 1))
                a = bb.emit_te(attn, qr, ck, cv, pos, layer_c, *([span] if span is not None else []),
                               primfunc_name_hint="attention")
                h = self._linear(bb, P, f"{p}.self_attn.o_proj", a, mode, residual=h)
                xn = bb.emit_te(rms, h, P(f"{p}.post_attention_layernorm"), primfunc_name_hint="rmsnorm")
                g = self._linear(bb, P, f"{p}.mlp.gate_proj", xn, mode)
                u = self._linear(bb, P, f"{p}.mlp.up_proj", xn, mode)
                act = bb.emit_te(te_silu_mul, g, u, primfunc_name_hint="silu_mul")
                h = self._linear(bb, P, f"{p}.mlp.down_proj", act, mode, residual=h)
            if last is not None:
                h = bb.emit_te(te_take_row, h, last, primfunc_name_hint="take_row")
            hn = bb.emit_te(rms, h, P("norm"), primfunc_name_hint="rmsnorm")
            n_rows = 1 if fname != "prefill_all" else L
            if "lm_head" in self.linear_specs:
                lg = self._linear(bb, P, "lm_head", hn, mode)
                lg = bb.emit(relax.op.reshape(lg, (n_rows, sp.vocab)))
            else:
                head = P("embed" if sp.tied else "lm_head")
                lg = bb.emit_te(te_lm_head, hn, head, primfunc_name_hint="lm_head")
                lg = bb.emit(relax.op.reshape(lg, (n_rows, sp.vocab_pad)))
                if sp.vocab_pad != sp.vocab:
                    lg = bb.emit(relax.op.strided_slice(lg, axes=[1], begin=[0], end=[sp.vocab]))
            bb.emit_func_output(relax.Tuple([lg, ck, cv]))

    def _embed(self, bb, P, ids):
        if not self.embed_from_head:
            return bb.emit_te(te_embed, ids, P("embed"), primfunc_name_hint="embed")
        spec = self.linear_specs["lm_head"]
        low = lowering(spec.format)
        head_names, extra = low.param_names(spec), embed_param_names(spec)

        def fn(ids, *arrays):
            return te_head_embed(ids, dict(zip(head_names + extra, arrays)), spec)
        arrays = [P(self._param_name(low, spec.format, "lm_head", k)) for k in head_names] + [P(k) for k in extra]
        return bb.emit_te(fn, ids, *arrays, primfunc_name_hint="embed")

    def _linear(self, bb, P, name: str, x, mode: str, residual=None):
        spec = self.linear_specs[name]
        if mode == "gemv":
            spec = gemv_i8.for_decode(spec, self.int8)
        low = lowering(spec.format)
        pnames = low.param_names(spec)

        def fn(x, *rest):
            args = dict(zip(pnames, rest[:len(pnames)]))
            res = rest[len(pnames)] if residual is not None else None
            return low.quip_linear_te(x, args, spec, mode, residual=res)
        extra = [residual] if residual is not None else []
        fmt = "" if spec.format == "grid" else f"{spec.format}_"
        hint = f"quip_{fmt}{mode}_{spec.m}x{spec.n}_b{spec.bits}"
        y = bb.emit_te(fn, x, *[P(self._param_name(low, spec.format, name, k)) for k in pnames], *extra,
                       primfunc_name_hint=hint)
        if self.layers[name].has_row_patch:
            if residual is not None:
                raise ValueError(f"{name}: a row patch on a layer with a fused residual is not supported")
            y = row_patch.emit(bb, x, y, *(P(f"{name}.{k}") for k in ("row_tiles", "row_scale", "row_slot")))
        return y
