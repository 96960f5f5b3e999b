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
            torch.ops.quipc.quip_embedding.default: quip_embedding,
            torch.ops.quipc.attention.default: grouped_attention}


def grouped_attention(q, k, v, mask, scaling: float, softcap: float):
    """torch.ops.quipc.attention in standard ONNX ops, as the hand-written graph computes it:
    the query heads of each kv head stacked as rows, (B, KV, rep * T, D), so the cache is read
    as it is (no kv head repeated, unlike transformers' eager attention), scores scaled,
    soft-capped, masked (the family's mask (B, 1, T, S), broadcast over the heads), softmax,
    the value product, and back to (B, T, H, D)."""
    from onnxscript import opset18 as op

    b, h, t, d = (op.Shape(q, start=i, end=i + 1) for i in range(4))
    kv, s = op.Shape(k, start=1, end=2), op.Shape(k, start=2, end=3)
    rep = op.Div(h, kv)
    stacked = op.Reshape(q, op.Concat(b, kv, op.Constant(value_ints=[-1]), d, axis=0))
    scores = op.Mul(op.MatMul(stacked, op.Transpose(k, perm=[0, 1, 3, 2])), op.Constant(value_float=scaling))
    if softcap:
        cap = op.Constant(value_float=softcap)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    if mask is not None:   # (B, KV, rep, T, S) + (B, 1, 1, T, S)
        scores = op.Add(op.Reshape(scores, op.Concat(b, kv, rep, t, s, axis=0)),
                        op.Unsqueeze(mask, op.Constant(value_ints=[2])))
    probs = op.Reshape(op.Softmax(scores, axis=-1), op.Concat(b, kv, op.Constant(value_ints=[-1]), s, axis=0))
    out = op.Reshape(op.MatMul(probs, v), op.Concat(b, h, t, d, axis=0))
    return op.Transpose(out, perm=[0, 2, 1, 3])


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
                       accuracy_level: int | None = 4, group: bool = True) -> QuipLinearEmitter:
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
