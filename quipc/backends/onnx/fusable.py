"""Rewrites of the traced ONNX graph into fewer nodes and the patterns onnxruntime fuses.

The dynamo exporter writes transformers' modules op by op. Two of them run in every layer and
cost one onnxruntime node dispatch per op at decode time (~3 us each on the 2-core host, more
than the arithmetic):
- RMSNorm `x * rsqrt(mean(x^2) + eps) * w` is exported as Mul(x, Reciprocal(Sqrt(...))).
  onnxruntime's optimizer fuses Pow, ReduceMean, Add, Sqrt, Div, Mul into one
  SimplifiedLayerNormalization node, so Mul(x, Reciprocal(s)) becomes Div(x, s).
- rotate_half(x) * sin = Concat(Neg(x[..., h:]), x[..., :h]) * sin is Gather(x, swap) * signed
  sin, with swap = (h .. 2h-1, 0 .. h-1) on the last axis and signed sin = sin * (-1 x h, +1 x h)
  computed once per sin tensor (all layers share it): 4 nodes per rotation become 1.
Both are exact rewrites up to float rounding (x / s against x * (1 / s)). The hand-written
Llama graph (llama.py) is written in these forms directly.
A third one is about dispatches only: every attention layer reads the batch, sequence and cache
lengths again with its own Shape nodes and builds the same reshape targets from them. A Shape
whose slice of its input's dimensions is the same named (or numeric) dimensions as an earlier
Shape's reuses that one's output, exactly: the exporter names a dynamic dimension by what it
is (torch.export proves equal the dimensions it names alike). onnxruntime's
common-subexpression pass then merges the Concats built from them. SmolLM2 w4: 1488 -> 1283
nodes after onnxruntime's optimizer, decode 11.39 against 12.04 ms (library, 2 threads).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def rotary_swap(half: int) -> np.ndarray:
    """Gather indices on the last axis that swap its two halves: (x1, x2) -> (x2, x1)."""
    return np.concatenate([np.arange(half, 2 * half), np.arange(half)]).astype(np.int64)


def rotary_sign(half: int) -> np.ndarray:
    """The sign rotate_half puts on the swapped halves: (-1 x half, +1 x half)."""
    return np.concatenate([-np.ones(half), np.ones(half)]).astype(np.float32)


def _named_dims(graph: onnx.GraphProto) -> dict[str, list]:
    """Per value with a declared shape: each dimension's name (dim_param), number (dim_value)
    or None (unknown)."""
    out = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                            for d in vi.type.tensor_type.shape.dim]
    return out


class _Graph:
    """A GraphProto's top-level nodes (held in a list, so that they keep their identity), their
    producers and consumers, and constant values."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.dims = _named_dims(graph)
        self.ranks = {name: len(d) for name, d in self.dims.items()}

    def const(self, name: str):
        """The value of a constant (initializer or Constant node), else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_int", "value_ints"):
                return np.array(helper.get_attribute_value(attr))
        return None

    def only_use(self, name: str) -> bool:
        return len(self.consumers.get(name, [])) == 1 and name not in self.outputs

    def rebuild(self, dead: set, before: dict | None = None) -> None:
        """Write the node list back: nodes whose id is in `dead` dropped, before[id(node)]
        inserted ahead of a node."""
        before = before or {}
        out, gone = [], set()
        for n in self.nodes:
            if id(n) in dead:
                gone.update(n.output)
                continue
            out.extend(before.get(id(n), []))
            kept = onnx.NodeProto()
            kept.CopyFrom(n)
            out.append(kept)
        del self.graph.node[:]
        self.graph.node.extend(out)
        infos = [vi for vi in self.graph.value_info if vi.name not in gone]
        del self.graph.value_info[:]
        self.graph.value_info.extend(infos)


def rms_norm_divs(model: onnx.ModelProto) -> int:
    """Mul(x, Reciprocal(Sqrt(v))) -> Div(x, Sqrt(v)); returns how many were rewritten."""
    g = _Graph(model.graph)
    done, dead = 0, set()
    for node in g.nodes:
        if node.op_type != "Mul":
            continue
        for side in (0, 1):
            rec = g.producer.get(node.input[side])
            if rec is None or rec.op_type != "Reciprocal" or not g.only_use(rec.output[0]):
                continue
            sqrt = g.producer.get(rec.input[0])
            if sqrt is None or sqrt.op_type != "Sqrt":
                continue
            x = node.input[1 - side]
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([x, sqrt.output[0]])
            dead.add(id(rec))
            done += 1
            break
    if done:
        g.rebuild(dead)
    return done


def _last_axis_slice(g: _Graph, node):
    """(x, start, end) of a unit-step Slice of one axis, the last one, else None."""
    if node is None or node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (g.const(node.input[i]) for i in (1, 2, 3))
    steps = g.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(steps.reshape(())) != 1:
        return None
    axis, rank = int(axes.reshape(())), g.ranks.get(node.input[0])
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    return node.input[0], int(starts.reshape(())), int(ends.reshape(()))


def rotate_half_gathers(model: onnx.ModelProto) -> int:
    """Mul(Concat(Neg(x[..., h:]), x[..., :h]), sin) -> Mul(Gather(x, swap), sin * sign);
    returns how many were rewritten."""
    g = _Graph(model.graph)
    graph = model.graph
    signed: dict[tuple, str] = {}     # (sin tensor, h) -> its signed copy
    consts: dict[str, np.ndarray] = {}
    before: dict[int, list] = {}      # id(node) -> nodes to insert ahead of it
    dead, done = set(), 0
    for node in g.nodes:
        if node.op_type != "Mul":
            continue
        for side in (0, 1):
            cat = g.producer.get(node.input[side])
            if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or not g.only_use(cat.output[0]):
                continue
            axis = [helper.get_attribute_value(a) for a in cat.attribute if a.name == "axis"]
            neg = g.producer.get(cat.input[0])
            if axis != [-1] or neg is None or neg.op_type != "Neg" or not g.only_use(neg.output[0]):
                continue
            high_node, low_node = g.producer.get(neg.input[0]), g.producer.get(cat.input[1])
            high, low = _last_axis_slice(g, high_node), _last_axis_slice(g, low_node)
            if high is None or low is None or high[0] != low[0]:
                continue
            h = low[2]
            if low[1] != 0 or h <= 0 or high[1] != h or high[2] < 2 * h:
                continue
            x, sin = high[0], node.input[1 - side]
            swap, sign = f"quipc.rotary_swap_{h}", f"quipc.rotary_sign_{h}"
            consts.setdefault(swap, rotary_swap(h))
            consts.setdefault(sign, rotary_sign(h))
            ahead = []
            if (sin, h) not in signed:   # once per sin tensor: every layer shares it
                signed[(sin, h)] = f"{sin}.quipc_signed_{h}"
                ahead.append(helper.make_node("Mul", [sin, sign], [signed[(sin, h)]],
                                              name=f"{sin}.quipc_signed_{h}"))
            swapped = f"{node.output[0]}.quipc_swapped"
            ahead.append(helper.make_node("Gather", [x, swap], [swapped], axis=-1,
                                          name=f"{node.output[0]}.quipc_swap"))
            before[id(node)] = ahead
            del node.input[:]
            node.input.extend([swapped, signed[(sin, h)]])
            dead.update((id(cat), id(neg)))
            for sl in (high_node, low_node):
                if all(id(c) in dead for c in g.consumers.get(sl.output[0], [])):
                    dead.add(id(sl))
            done += 1
            break
    if done:
        for name, value in consts.items():
            if name not in g.inits:
                graph.initializer.append(numpy_helper.from_array(value, name))
        g.rebuild(dead, before)
    return done


def shared_shapes(model: onnx.ModelProto) -> int:
    """Shape(x, start, end) whose slice of x's dimensions is all named or numeric and equal to an
    earlier Shape's -> that Shape's output; returns how many Shape nodes were dropped."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0   # a subgraph may read the values by name: leave such models alone
    g = _Graph(graph)
    dims = g.dims
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    dead = set()
    for node in g.nodes:
        if node.op_type != "Shape" or node.input[0] not in dims or node.output[0] in g.outputs:
            continue
        d = dims[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        part = tuple(d[attrs.get("start", 0):attrs.get("end", len(d))])
        if not part or any(x is None or x == "" for x in part):
            continue
        if part in first:
            rename[node.output[0]] = first[part]
            dead.add(id(node))
        else:
            first[part] = node.output[0]
    for node in g.nodes:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    if dead:
        g.rebuild(dead)
    return len(dead)


def rewrite(model: onnx.ModelProto) -> dict:
    """Every rewrite above, in place; returns the counts."""
    return {"rms_norm_divs": rms_norm_divs(model), "rotate_half_gathers": rotate_half_gathers(model),
            "shared_shapes": shared_shapes(model)}
