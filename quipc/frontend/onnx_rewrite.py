"""Rewriting an ONNX graph: each target MatMul/Gemm becomes a QuipLinear node (or its
standard-op body); MatMuls reading one tensor become one QuipLinearGroup node, placed where the
first of them was; the float weights they read and the nodes that only fed them are dropped."""
from __future__ import annotations

import onnx
from onnx import TensorProto

from ..backends.onnx.builder import Builder
from ..backends.onnx.emitter import QuipLinearEmitter
from ..backends.onnx.export import IR_VERSION
from .onnx_segments import node_reads
from .onnx_targets import Target, opset_default


def replace_linears(model: onnx.ModelProto, targets: list[Target], layers: dict, ops: str,
                    accuracy_level: int | None, ranks: dict | None = None) -> onnx.ModelProto:
    g = model.graph
    opset = opset_default(model)
    b = Builder(prefix="quipc/", opset=opset)
    emitter = QuipLinearEmitter(b, ops=ops, accuracy_level=accuracy_level, opset=opset)
    elem = _value_types(model)
    by_index = {t.index: t for t in targets}
    readers: dict[str, list[Target]] = {}
    for t in targets:
        readers.setdefault(t.x, []).append(t)
    new_nodes = []
    for idx, node in enumerate(g.node):
        t = by_index.get(idx)
        if t is None:
            new_nodes.append(node)
            continue
        group = readers[t.x]
        if t is not group[0]:
            continue   # emitted with the first MatMul reading the same x (its position precedes)
        start = len(b.nodes)
        x = t.x
        half = elem.get(x, TensorProto.FLOAT) != TensorProto.FLOAT
        if half:
            x = b.op("Cast", x, to=TensorProto.FLOAT)
        outs = [u.node.output[0] for u in group]
        ys = emitter.emit_group(x, [layers[u.name] for u in group], out_names=[None if half else o for o in outs],
                                rank=(ranks or {}).get(t.x))
        if half:
            for y, o in zip(ys, outs):
                b.op("Cast", y, to=elem[t.x], out_name=o)
        new_nodes.extend(b.nodes[start:])
    dropped = {d for t in targets for d in t.weight_names} | {t.node.input[2] for t in targets
                                                              if t.node.op_type == "Gemm" and len(t.node.input) > 2}
    # Transposes feeding a replaced MatMul are now dead: drop nodes whose outputs are unused
    keep_nodes = _prune(new_nodes, {o.name for o in g.output})
    used = set().union(*(node_reads(n) for n in keep_nodes))  # subgraphs' outer reads included
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep_nodes)
    inits = [i for i in model.graph.initializer if not (i.name in dropped and i.name not in used)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits + list(b.initializers.values()))
    names = {i.name for i in inits}
    graph_inputs = [i for i in model.graph.input if not (i.name in dropped and i.name not in names)]
    del out.graph.input[:]
    out.graph.input.extend(graph_inputs)
    have = {(o.domain, o.version) for o in out.opset_import}
    for o in emitter.opsets():
        if o.domain and all(d != o.domain for d, _ in have):
            out.opset_import.append(o)
    out.functions.extend(emitter.functions.values())
    out.ir_version = max(out.ir_version, IR_VERSION)
    return out


def _prune(nodes, graph_outputs: set) -> list:
    needed = set(graph_outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed |= node_reads(n)
    return list(reversed(keep))


def _value_types(model) -> dict:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    if not all(t == TensorProto.FLOAT for t in types.values()):
        try:  # need the element type of every MatMul input: infer shapes once
            inferred = onnx.shape_inference.infer_shapes(model)
            types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
        except Exception:
            pass
    return types
