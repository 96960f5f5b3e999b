"""The traced graph's quipc ops in ONNX: first placeholders, then the real nodes.

The dynamo exporter translates torch.ops.quipc.quip_linear / quip_embedding (through
`TRANSLATIONS`) to one placeholder node each, `ai.quipc.traced::QuipLinearRef(x)` /
`QuipEmbeddingRef(ids)` with the op's key and size as attributes. `lower_placeholders` then
writes, in place of the placeholders, what the hand-written graph has: layers that read the same
tensor with the same input side become one `ai.quipc::QuipLinearGroup` node, the others one
`ai.quipc::QuipLinear` node each (QuipLinearEmitter: same functions, same initializers), and
the quantized embedding its Gather + dequantize (embedding.embedding_fn).
"""
from __future__ import annotations

import onnx
from onnx import helper
from onnx.defs import OpSchema

from quipc_runtime.torch_ops import layer_name

from .builder import Builder
from .embedding import embedding_fn
from .emitter import QuipLinearEmitter
from .quip_function import _rename

PLACEHOLDER_DOMAIN = "ai.quipc.traced"


def _schema(op: str, size_attr: str, in_type: str) -> OpSchema:
    return OpSchema(op, PLACEHOLDER_DOMAIN, 1, inputs=[OpSchema.FormalParameter("x", "T")],
                    outputs=[OpSchema.FormalParameter("y", "tensor(float)")],
                    type_constraints=[("T", [in_type], "")],
                    attributes=[OpSchema.Attribute("key", OpSchema.AttrType.STRING, "op key", required=True),
                                OpSchema.Attribute(size_attr, OpSchema.AttrType.INT, "size", required=True)])


def translations() -> dict:
    """custom_translation_table for torch.onnx.export(..., dynamo=True)."""
    import torch
    from onnxscript import values

    import quipc_runtime.torch_ops  # noqa: F401  registers the ops

    domain = values.Opset(PLACEHOLDER_DOMAIN, 1)
    linear_op = values.Op(domain, "QuipLinearRef", _schema("QuipLinearRef", "out_features", "tensor(float)"))
    embed_op = values.Op(domain, "QuipEmbeddingRef", _schema("QuipEmbeddingRef", "dim", "tensor(int64)"))

    def quip_linear(x, key: str, out_features: int):
        return linear_op(x, key=key, out_features=out_features)

    def quip_embedding(ids, key: str, dim: int):
        return embed_op(ids, key=key, dim=dim)
    return {torch.ops.quipc.quip_linear.default: quip_linear,
            torch.ops.quipc.quip_embedding.default: quip_embedding}


def _attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _name(node: onnx.NodeProto) -> str:
    key = _attr(node, "key")
    return layer_name(key.decode() if isinstance(key, bytes) else key)


def _ranks(graph: onnx.GraphProto) -> dict[str, int]:
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}


def _clusters(emitter: QuipLinearEmitter, nodes: list, layers: dict) -> list[list]:
    """Placeholders reading one tensor, split into groups that share the input side."""
    clusters: list[list] = []
    for node in nodes:
        home = next((c for c in clusters if emitter.can_group([layers[_name(c[0])], layers[_name(node)]])), None)
        if home is None:
            clusters.append([node])
        else:
            home.append(node)
    return clusters


def lower_placeholders(model: onnx.ModelProto, layers: dict, embeddings: dict, *, ops: str = "quip",
                       accuracy_level: int = 4, group: bool = True) -> QuipLinearEmitter:
    """Replace every placeholder of `model` (in place); layers: name -> QuantizedLinear,
    embeddings: name -> the embedding's source (QuantizedLinear head or EmbeddingTable)."""
    g = model.graph
    b = Builder(prefix="quipc/")
    emitter = QuipLinearEmitter(b, ops=ops, accuracy_level=accuracy_level)
    ranks = _ranks(g)
    readers: dict[str, list] = {}
    for node in g.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == "QuipLinearRef":
            readers.setdefault(node.input[0], []).append(node)
    kept, done = [], set()
    for node in g.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            kept.append(node)
            continue
        if id(node) in done:
            continue
        start = len(b.nodes)
        if node.op_type == "QuipLinearRef":
            x = node.input[0]
            todo = [n for n in readers[x] if id(n) not in done] if group else [node]
            for cluster in _clusters(emitter, todo, _needed(layers, todo)):
                emitter.emit_group(x, [layers[_name(n)] for n in cluster], [n.output[0] for n in cluster],
                                   rank=ranks.get(x))
                done.update(id(n) for n in cluster)
        elif node.op_type == "QuipEmbeddingRef":
            name = _name(node)
            if name not in embeddings:
                raise ValueError(f"the traced graph embeds with {name}, which the artifact does not store quantized")
            _rename(b, embedding_fn(embeddings[name], name)(b, node.input[0]), node.output[0])
            done.add(id(node))
        else:
            raise ValueError(f"unknown quipc placeholder {node.op_type}")
        kept.extend(b.nodes[start:])
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(b.initializers.values())
    model.functions.extend(emitter.functions.values())
    _set_opsets(model, emitter)
    return emitter


def _needed(layers: dict, nodes: list) -> dict:
    missing = [_name(n) for n in nodes if _name(n) not in layers]
    if missing:
        raise ValueError(f"the traced graph calls quantized layers the artifact lacks: {missing[:3]}")
    return layers


def _set_opsets(model: onnx.ModelProto, emitter: QuipLinearEmitter) -> None:
    have = {o.domain: o.version for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN}
    for o in emitter.opsets():
        if o.domain == "" and have.get("", o.version) != o.version:
            raise ValueError(f"the traced graph uses opset {have['']} but the quipc functions opset {o.version}")
        have.setdefault(o.domain, o.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(have.items()))
