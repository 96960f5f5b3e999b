"""`quipc compile MODEL --target tvm --graph traced`: the artifact's transformers model captured by
torch.export (backends/traced) and imported with Relax's `from_exported_program`, each
quantized linear one `call_tir` of the same TIR kernel the hand-written build uses
(lowering.linear_prim_func, scheduled by schedules/), and each layer's attention one `call_tir`
of traced_attention.py (the model captured with torch.ops.quipc.attention in place of
transformers' eager attention), for every family in backends/traced/families.py.

Three Relax functions over a cache of fixed capacity C, updated in place (traced_cache.py;
per layer and kind (1, kv_heads, C, head_dim), handed back as it came; `span` is an int64
tensor whose length S = past + seq is the number of positions held after the call):
    forward(input_ids (1, seq / 16, 16) int64, span (S,), caches...) -> (logits (1, seq, vocab), caches...)
        seq a multiple of 16 (ROW_MULTIPLE: the runtime pads prompts at the end; the GEMM
        kernels take the rows as they are)
    prefill(input_ids (1, seq / 16, 16) int64, span, caches..., last (1,) int64)
            -> (logits (1, 1, vocab) of row `last`, caches...)
        the same, the lm_head on the last real row only (a prompt needs no other row's logits)
    decode(input_ids (1, 1) int64, span, caches...)    -> (logits (1, 1, vocab), caches...)
        the GEMV kernels
(Builds made before the capacity cache, config without "cache", took and returned the cache
concatenated, `past` in and `present` one position longer out; tvm_traced.py runs both.)
The quantized parameters are constants of the module (no params.bin). A trellis lm_head is built
on its rows rounded to 8 bits (trellis_as_int8). An embedding that shares a grid, e8p or such a
head's codes decodes from that head's constants (embedding.py), as in the hand-written build;
other quantized embeddings are dequantized to fp32 at build time. Run it with
`quipc_runtime.tvm_runtime.TvmLM` (which hands a traced build to tvm_traced.TracedTvmLM).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import e8p_as_grid, gemv_i8, trellis_as_int8
from .build import CONFIG, FORMAT_VERSION, LIB, resolve_target, write_build
from .traced_cache import CapacityCache

FUNCTIONS = ("forward", "prefill", "decode")
ROW_MULTIPLE = 16    # the GEMM schedules split rows without a bounds predicate


class QuipConverters:
    """custom_convert_map for from_exported_program: quip_linear -> call_tir of the layer's TIR
    kernel (one PrimFunc per distinct spec and mode), quip_embedding -> take from the table."""

    def __init__(self, layers: dict, tables: dict, prefix: str, llvm: bool, shared_head=None, int8: bool = False):
        """shared_head: the grid or e8p lm_head whose codes are the embedding table (embedding.py),
        decoded in the graph; other quantized embeddings come as dense `tables`. int8: the 4-bit
        GEMVs on int8 activations (gemv_i8.py; the caller checks the target)."""
        self.layers, self.tables, self.prefix, self.llvm = layers, tables, prefix, llvm
        self.int8 = int8
        self.shared_head = shared_head
        self.funcs: dict = {}
        self.consts: dict = {}
        self.cache = CapacityCache(prefix)

    def convert_map(self) -> dict:
        return {"quip_linear.default": self.linear, "quip_embedding.default": self.embedding,
                "attention.default": self.attention, "kv_write.default": self.kv_write,
                "silu.default": self.silu, "linear.default": self.dense_linear}

    def _kernel(self, bb, spec, mode: str):
        from .lowering import linear_prim_func
        from .schedules import schedule_func

        if mode == "gemv":
            spec = gemv_i8.for_decode(spec, self.int8)
        key = (spec, mode)
        if key not in self.funcs:
            func = linear_prim_func(spec, mode)
            if self.llvm:
                func = schedule_func(func)
            fmt = "" if spec.format == "grid" else f"{spec.format}_"
            hint = f"{self.prefix}quip_{fmt}{mode}_{spec.m}x{spec.n}_b{spec.bits}_{len(self.funcs)}"
            func = func.with_attr("tir.is_scheduled", True).with_attr("global_symbol", hint)
            self.funcs[key] = bb.add_func(func, hint)
        return self.funcs[key]

    def _const(self, low, fmt: str, name: str, key: str, arr: np.ndarray):
        """A layer's array as a constant; a SHARED one (a format's codebook table) named by the format."""
        return self._named_const(f"{fmt}.{key}" if key in low.SHARED else f"{name}.{key}", arr)

    def _named_const(self, cname: str, arr: np.ndarray):
        """One relax constant per name (a SHARED codebook, a layer's array) in the module."""
        from tvm import relax

        if cname not in self.consts:
            self.consts[cname] = relax.const(np.ascontiguousarray(arr))
        return self.consts[cname]

    def linear(self, node, importer):
        from tvm import relax, tirx

        from quipc_runtime.torch_ops import layer_name

        from . import row_patch
        from .lowering import lowering
        from .tir_quip_linear import LinearSpec

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        name = layer_name(node.args[1])
        if name not in self.layers:
            raise ValueError(f"the traced graph calls {name}, which the artifact does not store quantized")
        layer = self.layers[name]
        spec = LinearSpec.of(layer)
        low = lowering(spec.format)
        shape = list(x.ty.shape)
        rows = 1
        for d in shape[:-1]:
            rows = rows * d
        x2 = bb.emit(relax.op.reshape(x, [rows, spec.n]))
        params = [self._const(low, spec.format, name, k, v) for k, v in _ordered(low, layer, spec)]
        static_one = isinstance(rows, (int, tirx.IntImm)) and int(rows) == 1
        if static_one:
            y = bb.emit(relax.call_tir(self._kernel(bb, spec, "gemv"), [x2, *params],
                                       relax.TensorType([1, spec.m], "float32")))
        elif _multiple_of(rows, ROW_MULTIPLE):   # a padded prompt's rows: the kernel takes them as they are
            y = bb.emit(relax.call_tir(self._kernel(bb, spec, "gemm"), [x2, *params],
                                       relax.TensorType([rows, spec.m], "float32")))
        else:
            padded = (rows + ROW_MULTIPLE - 1) // ROW_MULTIPLE * ROW_MULTIPLE
            pad = bb.emit(relax.op.zeros(relax.ShapeExpr([padded - rows, spec.n]), "float32"))
            xp = bb.emit(relax.op.concat([x2, pad], axis=0))
            yp = bb.emit(relax.call_tir(self._kernel(bb, spec, "gemm"), [xp, *params],
                                        relax.TensorType([padded, spec.m], "float32")))
            y = bb.emit(relax.op.strided_slice(yp, axes=[0], begin=[0], end=[rows]))
        if layer.has_row_patch:
            arrays = [self._named_const(k, v) for k, v in row_patch.params(layer, name).items()]
            y = row_patch.emit(bb, x2, y, *arrays, prefix=self.prefix)
        return bb.emit(relax.op.reshape(y, shape[:-1] + [spec.m]))

    def dense_linear(self, node, importer):
        """A linear the artifact keeps dense: one row per sequence (decode, a prefill's last row)
        by dense_gemv (W read as stored), whole prompts by Relax's linear (legalized and
        scheduled with the prompt's operators)."""
        from tvm import relax, tirx

        from . import dense_gemv

        bb, env = importer.block_builder, importer.env
        x, w = env[node.args[0]], env[node.args[1]]
        bias = env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
        shape = [int(d) if isinstance(d, (int, tirx.IntImm)) else d for d in x.ty.shape]
        n, m = int(shape[-1]), int(w.ty.shape[0])
        if not dense_gemv.applies(shape, n) or str(x.ty.dtype) != "float32":
            return bb.emit(relax.op.linear(x, w, bias))
        rows = shape[0]
        static = isinstance(rows, int)
        key = ("dense", n, m, bias is not None, rows if static else "batch")
        if key not in self.funcs:
            hint = f"{self.prefix}dense_gemv_{m}x{n}"
            func = dense_gemv.prim_func(n, m, bias is not None, rows if static else tirx.Var("rows", "int64"))
            func = func.with_attr("tir.is_scheduled", True)
            self.funcs[key] = bb.add_func(func.with_attr("global_symbol", hint), hint)
        x2 = bb.emit(relax.op.reshape(x, [rows, n]))
        y = bb.emit(relax.call_tir(self.funcs[key], [x2, w] + ([bias] if bias is not None else []),
                                   relax.TensorType([rows, m], "float32")))
        return bb.emit(relax.op.reshape(y, shape[:-1] + [m]))

    def attention(self, node, importer):
        from . import traced_attention

        env = importer.env
        q, k, v, mask = (None if a is None else env[a] for a in node.args[:4])
        scaling, softcap = float(node.args[4]), float(node.args[5])
        span = self.cache.span_of(k)
        if (span is None) != (self.cache.span_of(v) is None):
            raise ValueError("the traced attention reads keys and values of different caches")
        return traced_attention.emit(importer.block_builder, q, k, v, mask, scaling, softcap,
                                     f"{self.prefix}attention", span)

    def silu(self, node, importer):
        """x * sigmoid(x) with TVM's vectorizable fast_exp (relative error ~1e-6) in place of
        the default lowering's scalar expf per element (the prompt's costliest op after the
        linears and attention)."""
        from tvm import te, tirx, topi

        def fn(x):
            e = topi.fast_exp(topi.negative(x))
            return te.compute(x.shape, lambda *i: x(*i) / (e(*i) + tirx.const(1.0, "float32")), name="silu")
        return importer.block_builder.emit_te(fn, importer.env[node.args[0]],
                                               primfunc_name_hint=f"{self.prefix}silu")

    def kv_write(self, node, importer):
        env = importer.env
        return self.cache.emit(importer.block_builder, *(env[a] for a in node.args[:3]))

    def embedding(self, node, importer):
        from tvm import relax

        from quipc_runtime.torch_ops import layer_name

        name = layer_name(node.args[1])
        if self.shared_head is not None and name == "model.embed_tokens":
            return self._head_embedding(node, importer)
        if name not in self.tables:
            raise ValueError(f"the traced graph embeds with {name}, which the artifact does not store quantized")
        if name not in self.consts:
            self.consts[name] = relax.const(self.tables[name])
        ids = importer.env[node.args[0]]
        return importer.block_builder.emit(relax.op.take(self.consts[name], ids, axis=0))

    def _head_embedding(self, node, importer):
        from tvm import relax

        from .embedding import embed_params, te_head_embed
        from .lowering import lowering
        from .tir_quip_linear import LinearSpec

        bb, head = importer.block_builder, self.shared_head
        spec = LinearSpec.of(head)
        low = lowering(spec.format)
        arrays = _ordered(low, head, spec) + list(embed_params(head, spec).items())
        names = [k for k, _ in arrays]
        consts = [self._const(low, spec.format, "lm_head", k, v) for k, v in arrays]
        ids = importer.env[node.args[0]]
        shape = list(ids.ty.shape)
        count = 1
        for d in shape:
            count = count * d
        flat = bb.emit(relax.op.reshape(ids, [count]))

        def fn(ids, *arrs):
            return te_head_embed(ids, dict(zip(names, arrs)), spec)
        rows = bb.emit_te(fn, flat, *consts, primfunc_name_hint=f"{self.prefix}embed")
        return bb.emit(relax.op.reshape(rows, shape + [spec.n]))


def _multiple_of(rows, k: int) -> bool:
    from tvm import sym, tirx

    return bool(sym.Analyzer().can_prove(tirx.floormod(rows, k) == 0))


def _shared_head(manifest: dict, layers: dict):
    """The lm_head layer when the embedding shares its codes and the graph can decode them."""
    from .embedding import shares_head

    head = layers.get("lm_head")
    kind = (manifest.get("embedding") or {}).get("kind")
    return head if kind == "head" and shares_head(head) else None


def _ordered(low, layer, spec) -> list:
    params = low.linear_params(layer, spec)
    return [(k, params[k]) for k in low.param_names(spec)]


def _dense_tables(traceable) -> dict:
    """name -> fp32 table of each quantized embedding (its reference module's table)."""
    from quipc_runtime.torch_ops import module_for

    tables = {}
    for name, module in traceable.model.named_modules():
        if type(module).__name__ == "QuipOpEmbedding":
            tables[name] = np.ascontiguousarray(module_for(module.key).table.numpy(), dtype=np.float32)
    return tables


def _import(captured, converters: QuipConverters):
    from tvm.relax.frontend.torch import from_exported_program

    import torch

    table = torch.export.default_decompositions()
    del table[torch.ops.aten.silu.default]   # converted whole (QuipConverters.silu)
    del table[torch.ops.aten.linear.default]   # dense linears: QuipConverters.dense_linear
    try:
        program = captured.program.run_decompositions(table)
        return from_exported_program(program, custom_convert_map=converters.convert_map(),
                                     run_ep_decomposition=False)
    except Exception as e:
        raise ValueError(f"{captured.family.name}: Relax cannot import the traced graph: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def build_module(artifact: Path, llvm: bool = True, cache: str = "capacity", e8p_kernel: str = "grid4",
                 int8: bool = False, trellis_kernel: str = "int8"):
    """(IRModule with FUNCTIONS, Traceable). cache: "capacity" (updated in place) or "concat"
    (what builds before the capacity cache were; kept so that their runtime path stays tested).
    e8p_kernel: "grid4" runs 2- and 4-bit e8p layers by 4-bit grid kernels (e8p_as_grid),
    "codebook" by the e8p kernel (half the bytes, slower). trellis_kernel: "int8" runs trellis
    layers on their rows rounded to 8 bits (trellis_as_int8), "codes" only the head so. int8:
    decode's 4-bit GEMVs on int8 activations (gemv_i8; only for targets where gemv_i8.supported)."""
    import tvm

    from quipc_runtime import artifact as art

    from ..traced import Traceable

    traceable = Traceable.load(Path(artifact), attention="op")
    layers = art.load_layers(Path(artifact), traceable.manifest)
    if traceable.manifest.get("head"):
        (head,) = art.load_block(Path(artifact), traceable.manifest["head"])
        layers[traceable.manifest["head"]["module"]] = head
    layers = trellis_as_int8.kernel_layers(layers, trellis_kernel)
    shared = _shared_head(traceable.manifest, layers)
    tables = {} if shared is not None else _dense_tables(traceable)
    if e8p_kernel not in e8p_as_grid.KERNELS:
        raise ValueError(f"unknown e8p kernel {e8p_kernel!r}: expected one of {', '.join(e8p_as_grid.KERNELS)}")
    if e8p_kernel == "grid4":
        layers = e8p_as_grid.kernel_layers(layers, keep=shared)
    mod = tvm.IRModule()
    # forward / prefill: batch stays dynamic (a static 1 there trips a stride guard); decode: one row, GEMV
    for fname, batch, seq, last_only in (("forward", None, None, False), ("prefill", None, None, True),
                                         ("decode", 1, 1, False)):
        rows = ROW_MULTIPLE if cache == "capacity" and seq is None else 1   # prompts padded by the runtime
        captured = traceable.capture(batch=batch, seq=seq, last_only=last_only, cache=cache, row_multiple=rows)
        part = _import(captured, QuipConverters(layers, tables, f"{fname}_", llvm, shared, int8=int8))
        for gv, func in part.functions.items():
            if gv.name_hint == "main":
                mod[fname] = func.with_attr("global_symbol", fname)
            else:
                mod[gv] = func
    return mod, traceable


def lower_operators(mod, tgt):
    """TVM's operators of the traced module legalized to PrimFuncs, decode's fused
    (decode_fusion.py), the prompt functions' scheduled (schedules/legalized.py)."""
    from tvm import relax

    from .decode_fusion import fuse_decode_ops
    from .schedules.legalized import schedule_prompt_ops

    with tgt:
        return schedule_prompt_ops(fuse_decode_ops(relax.transform.LegalizeOps()(mod)))


def compile_traced(artifact: Path, out: Path, *, target: str = "llvm", progress: bool = True,
                   cache: str = "capacity", e8p_kernel: str = "grid4", activations: str = "fp32",
                   trellis_kernel: str = "int8") -> Path:
    """A quipc artifact of any family in backends/traced/families.py -> OUT (model.so + config).
    activations: "fp32" (the torch path's sums, this function's default) or "int8" (decode's 4-bit
    GEMVs on int8 activations where the CPU has AVX2: what `quipc compile --target tvm` builds)."""
    import tvm

    from .build import _tvm_or_explain

    _tvm_or_explain()
    artifact, out = Path(artifact), Path(out)
    if (out / CONFIG).exists() or (out / LIB).exists():
        raise FileExistsError(f"{out} already holds a TVM build: choose another -o")
    tgt = resolve_target(target)
    if tgt.kind.name != "llvm":
        raise ValueError(f"the traced TVM build runs on llvm (CPU) targets, not {tgt.kind.name}: "
                         "use --graph handwritten for a llama model on cuda")
    log = (lambda msg: print(f"[quipc tvm traced] {msg}", flush=True)) if progress else (lambda msg: None)
    t0 = time.time()
    log(f"tracing {artifact}")
    int8 = gemv_i8.use_int8(activations, tgt)
    mod, traceable = build_module(artifact, cache=cache, e8p_kernel=e8p_kernel, int8=int8,
                                  trellis_kernel=trellis_kernel)
    log(f"compiling for {tgt}{' (4-bit GEMVs on int8 activations)' if int8 else ''}")
    ex = tvm.compile(lower_operators(mod, tgt), target=tgt)
    lay = traceable.layout
    cfg = {"format": "quipc-tvm", "format_version": FORMAT_VERSION, "graph": "traced",
           "family": traceable.family.name, "model_type": traceable.model.config.model_type,
           "target": str(tgt), "device": "cpu", "functions": list(FUNCTIONS),
           "model": {"layers": lay.layers, "kv_heads": list(lay.kv_heads), "head_dims": list(lay.head_dims),
                     "vocab": int(traceable.model.config.vocab_size),
                     "max_pos": int(traceable.model.config.max_position_embeddings)},
           "eos_token_id": traceable.manifest["model_config"].get("eos_token_id"),
           "source_artifact": str(artifact.resolve()), "e8p_kernel": e8p_kernel,
           "trellis_kernel": trellis_kernel, "activations": "int8" if int8 else "fp32", "compile_seconds": None}
    if cache == "capacity":
        cfg["cache"], cfg["row_multiple"] = "capacity", ROW_MULTIPLE
    write_build(out, artifact, traceable.manifest, cfg, t0, lambda tmp: ex.export_library(str(tmp / LIB)))
    log(f"wrote {out} in {time.time() - t0:.0f} s")
    return out
