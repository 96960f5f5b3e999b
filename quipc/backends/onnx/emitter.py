"""QuipLinearEmitter: adds quantized linears to a graph Builder, as ai.quipc QuipLinear /
QuipLinearGroup nodes (their functions collected once per overload) or as their standard-op
bodies inlined. The code format's lowering (formats/) picks the weight-product mode."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from quipc_runtime.layer import QuantizedLinear

from .builder import MS_DOMAIN, OPSET, QUIPC_DOMAIN, Builder
from .formats import lowering_for
from .quip_function import emit_body, emit_group_body, make_function, make_group_function
from .variants import FORMAT_ATTR, GroupVariant, Variant, side_inputs


DENSE_LAYER_MAX = 256    # any transform up to this n: one MatMul by a per-layer matrix (signs folded)


def _same_input_side(a: QuantizedLinear, b: QuantizedLinear) -> bool:
    """Equal format, in_scale and input transform (compared as arrays: never assumed)."""
    if (a.format, a.bits, a.in_features, a.t_in.kind, tuple(a.t_in.orders)) != (
            b.format, b.bits, b.in_features, b.t_in.kind, tuple(b.t_in.orders)):
        return False
    if (a.in_scale is None) != (b.in_scale is None) or (a.in_scale is not None and not np.array_equal(
            a.in_scale, b.in_scale)):
        return False
    if not np.array_equal(a.t_in.sign_vector(), b.t_in.sign_vector()):
        return False
    return all(np.array_equal(x, y) for x, y in zip(a.t_in.matrices(), b.t_in.matrices()))


def _stackable(outs: list) -> bool:
    """Output transforms that can run once on the concatenated outputs: two Kronecker factors
    each, with the very same last factor (compared as arrays)."""
    mats = [t.matrices() for t in outs]
    return all(len(m) == 2 for m in mats) and all(
        m[1].shape == mats[0][1].shape and np.array_equal(m[1], mats[0][1]) for m in mats[1:])


def _group_name(names: list[str]) -> str:
    """model.layers.0.mlp.gate_proj, ...up_proj -> model.layers.0.mlp.gate_proj+up_proj.QuipLinearGroup"""
    prefix = names[0].rsplit(".", 1)[0] + "."
    if all(n.startswith(prefix) for n in names):
        return prefix + "+".join(n[len(prefix):] for n in names) + ".QuipLinearGroup"
    return "+".join(names) + ".QuipLinearGroup"


# accuracy_level None ("auto", `quipc compile --target onnx`'s default): per code format. Trellis
# nodes 4: their function bodies decode to a fp32 MatMul, which the level does not touch (the same
# perplexity to every digit in stock onnxruntime), and the custom-op library then runs their decode
# GEMVs on int8 activations (SmolLM2 w4: 11.2-11.5 against 13.3 ms a token, teacher-forced decode
# perplexity 39.38 against 39.26, +0.3 %), as TVM's default build. Grid and e8p nodes 0 ("unset"):
# at 4 their bodies' MatMulNBits would quantize activations in stock onnxruntime too (+13.5 % at
# w2), at 0 it keeps them fp32, while the library takes int8 for its decode GEMVs at 0 as at 4
# (cpp/ort/quip_node.h: int8_activations_at; stop 60: the w2 default 7.8 instead of 10.5 ms a
# token, decode perplexity +0.09 %). 1 keeps fp32 activations in both.
AUTO_ACCURACY_LEVEL = {"trellis": 4, "trellis256": 4}


def accuracy_level_for(level: int | None, fmt: str) -> int:
    """A node's accuracy_level: `level` when given, else the per-format choice above."""
    return AUTO_ACCURACY_LEVEL.get(fmt, 0) if level is None else level


def accuracy_level_label(level: int | None) -> int | str:
    """The export's accuracy_level as its metadata records it ("auto" for None)."""
    return "auto" if level is None else level


class QuipLinearEmitter:
    """Adds quantized linears to a graph Builder: as QuipLinear / QuipLinearGroup nodes
    (ops='quip') or as their standard-op bodies inlined (ops='std')."""

    def __init__(self, b: Builder, ops: str = "quip", accuracy_level: int | None = 4, opset: int = OPSET,
                 native_2bit: bool = False, dense_layer_max: int = DENSE_LAYER_MAX,
                 stack_outputs: bool = True):
        if ops not in ("quip", "std"):
            raise ValueError(f"unknown ONNX ops mode {ops!r}: expected 'quip' or 'std'")
        self.b, self.ops, self.accuracy_level, self.opset = b, ops, accuracy_level, opset
        self.native_2bit = native_2bit
        self.dense_layer_max, self.stack_outputs = dense_layer_max, stack_outputs
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.uses_ms = False
        self._node_names: set[str] = set()

    def _factors(self, layer: QuantizedLinear, side: str) -> list[str]:
        t = layer.t_in if side == "in" else layer.t_out
        names = []
        for i, (order, mat) in enumerate(zip(t.orders, t.matrices())):
            if t.kind == "hadamard":   # the same for every layer: stored once
                names.append(self.b.initializer(f"quipc.hadamard.{order}", mat))
            else:
                names.append(self.b.initializer(f"{layer.name}.{side}_factor{i}", mat))
        return names

    def _form(self, t, side: str, stacked: bool = False) -> str:
        """How a transform is applied (see FORMS): small ones as one per-layer dense matrix,
        unless the output side is stacked with the rest of its group."""
        mats = t.matrices()
        signs = side == "out" and t.signs is not None
        fold = bool(mats) and t.n <= self.dense_layer_max and (len(mats) > 1 or signs)
        return "d" if fold and not stacked else "k"

    def _plan(self, layer: QuantizedLinear, rank: int | None, input_side: bool = True,
              stacked: bool = False) -> tuple[Variant, dict, dict]:
        """The layer's Variant, literal attributes, and its inputs by Variant.input_names() key;
        input_side=False: a group's later part, whose in_scale / input transform are not added;
        stacked: its output transform runs stacked with its group's (kept as factors)."""
        low = lowering_for(layer)
        b, name = self.b, layer.name
        mode, block = low.plan(layer, self.ops, self.native_2bit)
        in_form = self._form(layer.t_in, "in")
        in_mats = self._factors(layer, "in") if input_side else []
        n_in = len(layer.t_in.matrices())
        out_form, out_mats = self._form(layer.t_out, "out", stacked), self._factors(layer, "out")
        v = Variant(mode, layer.bits, n_in, len(out_mats), layer.in_scale is not None,
                    layer.t_out.signs is not None, layer.bias is not None, rank == 3, in_form, out_form,
                    layer.format)
        named = {k: b.initializer(f"{name}.{k}", getattr(layer, k)) for k in low.weight_keys}
        if v.in_scale and input_side:
            named["in_scale"] = b.initializer(f"{name}.in_scale", layer.in_scale)
        if v.out_signs:
            named["out_sign_bits"] = b.initializer(f"{name}.out_sign_bits", layer.t_out.sign_bits())
        named.update(zip(side_inputs("in", in_form, n_in), in_mats))
        named.update(zip(side_inputs("out", out_form, len(out_mats)), out_mats))
        if v.bias:
            named["bias"] = b.initializer(f"{name}.bias", layer.bias.astype(np.float32))
        lit = {"bits": layer.bits, "in_features": layer.in_features, "out_features": layer.out_features,
               "block_size": block, "accuracy_level": accuracy_level_for(self.accuracy_level, layer.format)}
        return v, lit, named

    def _node_attrs(self, layer: QuantizedLinear) -> dict:
        """The format attribute (not written for grid: files as before formats existed)."""
        return {} if layer.format == "grid" else {FORMAT_ATTR: layer.format}

    def _node(self, op: str, ins: list[str], outs: list[str], name: str, overload: str, **attrs) -> None:
        if name in self._node_names:   # the same layer applied twice
            name = self.b.name(name)
        self._node_names.add(name)
        node = helper.make_node(op, ins, outs, name=name, domain=QUIPC_DOMAIN, **attrs)
        node.overload = overload
        self.b.nodes.append(node)

    def emit(self, x: str, layer: QuantizedLinear, out_name: str | None = None, rank: int | None = None) -> str:
        """y = layer(x); rank: x's rank when known (3 gives a body without shape ops)."""
        if layer.has_row_patch:
            return self._row_patch(x, self._emit_codes(x, layer, None, rank), layer, out_name)
        return self._emit_codes(x, layer, out_name, rank)

    def _row_patch(self, x: str, y: str, layer: QuantizedLinear, out_name: str | None) -> str:
        """y with its columns row_ids replaced by x @ rows^T, the rows kept at 8 bits: stored as
        int8 + fp16 scales, dequantized by nodes of initializers only (onnxruntime folds them
        once at session start), one MatMul, one ScatterElements."""
        b, name = self.b, layer.name
        f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
        vals = b.op("Cast", b.initializer(f"{name}.row_values", layer.row_values), to=f32)
        scale = b.op("Cast", b.initializer(f"{name}.row_scale", layer.row_scale), to=f32)
        w = b.op("Mul", vals, b.op("Unsqueeze", scale, b.ints([1])))           # (k, n)
        patch = b.op("MatMul", x, b.op("Transpose", w, perm=[1, 0]))            # (..., k)
        ids = b.op("Cast", b.initializer(f"{name}.row_ids", layer.row_ids), to=i64)
        idx = b.op("Expand", ids, b.op("Shape", patch))
        return b.op("ScatterElements", y, idx, patch, axis=-1, out_name=out_name or b.name(f"{name}.out"))

    def _emit_codes(self, x: str, layer: QuantizedLinear, out_name: str | None, rank: int | None) -> str:
        """layer(x) from its codes alone."""
        v, lit, named = self._plan(layer, rank)
        ins = [x] + [named[k] for k in v.input_names()[1:]]
        if self.ops == "std":
            return emit_body(self.b, v, ins, lit, out_name=out_name)
        self.uses_ms |= v.mode in lowering_for(layer).ms_modes
        if ("QuipLinear", v.overload) not in self.functions:
            self.functions[("QuipLinear", v.overload)] = make_function(v, self.opset)
        out = out_name or self.b.name(f"{layer.name}.out")
        self._node("QuipLinear", ins, [out], f"{layer.name}.QuipLinear", v.overload,
                   in_transform=layer.t_in.kind, out_transform=layer.t_out.kind, **lit,
                   **self._node_attrs(layer))
        return out

    def can_group(self, layers: list[QuantizedLinear]) -> bool:
        return (len(layers) > 1 and not any(la.has_row_patch for la in layers)
                and all(_same_input_side(layers[0], la) for la in layers[1:]))

    def emit_group(self, x: str, layers: list[QuantizedLinear], out_names: list[str | None] | None = None,
                   rank: int | None = None) -> list[str]:
        """[layer(x) for layer in layers]: one QuipLinearGroup node when they share in_scale and
        input transform (ops='quip'; 'std' inlines its body), else one node per layer."""
        out_names = out_names or [None] * len(layers)
        if not self.can_group(layers):
            return [self.emit(x, la, o, rank) for la, o in zip(layers, out_names)]
        stack = self.stack_outputs and _stackable([la.t_out for la in layers])
        plans = [self._plan(la, rank, input_side=i == 0, stacked=stack) for i, la in enumerate(layers)]
        g = GroupVariant(tuple(p[0] for p in plans), stack)
        lit = dict(plans[0][1], out_features=sum(la.out_features for la in layers),
                   out_split=[la.out_features for la in layers])
        ins = [x] + [plans[0][2][k] for k in g.shared_names()[1:]]
        ins += [p[2][k.split(".", 1)[1]] for i, p in enumerate(plans) for k in g.part_names(i)]
        if self.ops == "std":
            return emit_group_body(self.b, g, ins, lit, out_names)
        self.uses_ms |= g.parts[0].mode in lowering_for(layers[0]).ms_modes
        if ("QuipLinearGroup", g.overload) not in self.functions:
            self.functions[("QuipLinearGroup", g.overload)] = make_group_function(g, self.opset)
        outs = [o or self.b.name(f"{la.name}.out") for la, o in zip(layers, out_names)]
        self._node("QuipLinearGroup", ins, outs, _group_name([la.name for la in layers]),
                   g.overload, in_transform=layers[0].t_in.kind, out_transforms=[la.t_out.kind for la in layers],
                   layer_names=[la.name for la in layers], **lit, **self._node_attrs(layers[0]))
        return outs

    def opsets(self) -> list:
        ops = [helper.make_opsetid("", self.opset)]
        if self.ops == "quip":
            ops.append(helper.make_opsetid(QUIPC_DOMAIN, 1))
        if self.uses_ms:
            ops.append(helper.make_opsetid(MS_DOMAIN, 1))
        return ops
