"""The QuipLinear and QuipLinearGroup operators: one node per quantized linear (or per group
of linears reading the same tensor), defined as ONNX functions.

QuipLinear (domain ai.quipc, version 1, one `overload` per input layout, see variants.py):
    inputs : x, the format's weights (grid: codes (m, packed_row_bytes) uint8, scale (m,) fp16,
             zero (m,) fp16; e8p: codes uint8, scale (m, stages) fp16), [in_scale (n,) fp16],
             [out_sign_bits (ceil(m/8),) uint8, np.packbits order], input transform, output
             transform, [bias (m,) fp32]; a transform is given as its 0-2 Kronecker factors
    attributes: bits, in_features, out_features, block_size, accuracy_level,
                in_transform, out_transform (kind strings: hadamard | kron | identity),
                format (string; absent for grid)
    y = s_out * K_out^T (W' (K_in (in_scale * x))) + bias,  W' as the format defines it
    (quipc_runtime.formats), e.g. grid: W'[i, j] = scale[i] * code[i, j] + zero[i]

QuipLinearGroup (same domain; layers with equal format, in_scale and input transform, e.g. q/k/v):
    inputs : x, [in_scale], input transform, then per part i: p{i}.<weights>,
             [p{i}.out_sign_bits], p{i} output transform, [p{i}.bias]  (see GroupVariant)
    outputs: one y per part
    attributes: bits, in_features, out_features (the total), out_split (ints, per part),
                block_size, accuracy_level, in_transform, out_transforms (strings),
                layer_names (strings, read by inspect.layers_from_onnx; unused by the body), [format]
    in_scale and K_in once, the parts' weights concatenated (initializers only: folded
    once), one weight product, Split, then each part's own output side.
    Stacked output side (overload suffix `_st`: every part's output transform is two factors
    with the same last one, e.g. Hadamard q/k/v (36|12|12 x 16) or gate/up (12|12 x 128)):
    the output transforms run once on the concatenated y, the first factors as one
    block-diagonal matrix built in the body (folded), then one sign multiply, then Split.

Transform forms (transform_ops.py): k: one MatMul per Kronecker factor plus reshapes; d: n <= 256,
one MatMul by a per-layer dense matrix built in the body from the factors (output side: the
signs folded in), folded per layer. (A shared dense n x n Hadamard for n <= 640 was tried and
dropped: for SmolLM2's 576 it read 1.3 MB per use and was slower than the factors: w4 decode
12.1 vs 11.7 ms per token, prefill of 512 tokens 694 vs 581 ms, onnxruntime CPU, 2 threads.)

Weight products: one lowering per code format (formats/grid.py, formats/e8p.py), looked up by
the format's name. Every weight-side computation depends only on initializers, so onnxruntime
folds it once at session creation; files keep the compact quipc form.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .builder import MS_DOMAIN, OPSET, QUIPC_DOMAIN, Builder
from .formats import get_lowering
from .transform_ops import sign_vector, stacked_output, transform_in, transform_out
from .variants import ATTRS, FORMAT_ATTR, GROUP_ATTRS, GroupVariant, Variant, side_inputs

FLOAT = TensorProto.FLOAT


def _input_side(b: Builder, v: Variant, named: dict, n: str) -> str:
    """K_in (in_scale * x), flattened to (rows, n) unless rank3."""
    z = named["x"]
    if v.in_scale:
        z = b.op("Mul", z, b.op("Cast", named["in_scale"], to=FLOAT))
    if not v.rank3:
        z = b.op("Reshape", z, b.op("Concat", b.ints([-1]), n, axis=0))
    return transform_in(b, v, z, [named[k] for k in side_inputs("in", v.in_form, v.n_in)])


def _rename(b: Builder, old: str, new: str) -> str:
    """Give the node output `old` the name `new` (instead of adding an Identity)."""
    for node in reversed(b.nodes):
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = new
                return new
    raise ValueError(f"{old} is not a node output")


def _output_side(b: Builder, v: Variant, y: str, named: dict, x: str, m: str, out_name: str | None,
                 transformed: bool = False) -> str:
    """s_out * K_out^T y + bias for one layer (named: its inputs without a part prefix);
    transformed: y already is s_out * K_out^T y (a stacked group)."""
    if not transformed:
        signs = sign_vector(b, named["out_sign_bits"], m) if v.out_signs else None
        y = transform_out(b, v, y, [named[k] for k in side_inputs("out", v.out_form, v.n_out)], signs)
    if v.bias:
        y = b.op("Add", y, named["bias"])
    if v.rank3:
        return _rename(b, y, out_name) if out_name else y
    lead = b.op("Slice", b.op("Shape", x), b.ints([0]), b.ints([-1]))
    return b.op("Reshape", y, b.op("Concat", lead, m, axis=0), out_name=out_name)


def emit_body(b: Builder, v: Variant, ins: list[str], lit: dict, out_name: str | None = None) -> str:
    """Write the QuipLinear computation into b; ins follow v.input_names(); returns y."""
    named = dict(zip(v.input_names(), ins))
    n = b.attr_int("in_features", lit.get("in_features"))
    m = b.attr_int("out_features", lit.get("out_features"))
    z = _input_side(b, v, named, n)
    y = get_lowering(v.fmt).weight_product(b, v, z, {k: named[k] for k in v.weight_keys()}, m, lit)
    return _output_side(b, v, y, named, named["x"], m, out_name)


def emit_group_body(b: Builder, g: GroupVariant, ins: list[str], lit: dict,
                    out_names: list[str | None]) -> list[str]:
    """QuipLinearGroup: in_scale and K_in once, one weight product on the row-concatenated
    weights (Concat of initializers: folded once), then Split and each part's own output
    side. ins follow g.input_names(); returns the parts' outputs."""
    named = dict(zip(g.input_names(), ins))
    v0, k = g.parts[0], len(g.parts)
    n = b.attr_int("in_features", lit.get("in_features"))
    m = b.attr_int("out_features", lit.get("out_features"))
    z = _input_side(b, v0, named, n)
    cat = {key: b.op("Concat", *[named[f"p{i}.{key}"] for i in range(k)], axis=0) for key in v0.weight_keys()}
    y = get_lowering(v0.fmt).weight_product(b, v0, z, cat, m, lit)
    parts = [{key.split(".", 1)[1]: named[key] for key in g.part_names(i)} for i in range(k)]
    # (m_i,) from initializers (folded); the scale's first axis whatever its rank
    sizes = [b.op("Slice", b.op("Shape", part["scale"]), b.ints([0]), b.ints([1])) for part in parts]
    if g.stacked:
        y = stacked_output(b, g, y, parts, sizes)
    ys = b.op("Split", y, b.attr_ints("out_split", lit.get("out_split")), axis=-1, outputs=k)
    ys = [ys] if k == 1 else ys
    return [_output_side(b, v, ys[i], parts[i], named["x"], sizes[i], out_names[i], g.stacked)
            for i, v in enumerate(g.parts)]


def _function(name: str, overload: str, ins: list[str], outs: list[str], b: Builder, v: Variant,
              attrs: list[str], opset: int) -> onnx.FunctionProto:
    opsets = [helper.make_opsetid("", opset)]
    if v.mode in get_lowering(v.fmt).ms_modes:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    if v.fmt != "grid":
        attrs = attrs + [FORMAT_ATTR]
    f = helper.make_function(QUIPC_DOMAIN, name, ins, outs, b.nodes, opsets, attributes=attrs,
                             doc_string=f"quipc {name}, layout {overload}: see quipc.backends.onnx.quip_function")
    f.overload = overload
    return f


def make_function(v: Variant, opset: int = OPSET) -> onnx.FunctionProto:
    b = Builder(function=True, opset=opset)
    y = emit_body(b, v, v.input_names(), {}, out_name="y")
    return _function("QuipLinear", v.overload, v.input_names(), [y], b, v,
                     list(ATTRS) + ["in_transform", "out_transform"], opset)


def make_group_function(g: GroupVariant, opset: int = OPSET) -> onnx.FunctionProto:
    b = Builder(function=True, opset=opset)
    outs = emit_group_body(b, g, g.input_names(), {}, [f"y{i}" for i in range(len(g.parts))])
    return _function("QuipLinearGroup", g.overload, g.input_names(), outs, b, g.parts[0],
                     list(GROUP_ATTRS), opset)
