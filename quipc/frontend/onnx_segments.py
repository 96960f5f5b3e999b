"""The graph's structure for sequential calibration: which names each node reads (subgraphs
included), and a Segmenter that cuts a model's node list at given node indices and builds each
piece [start, end) as an ONNX model of its own (onnx_sequential runs them one after another).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def _is_const_node(node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not any(node.input)


def _subgraph_reads(graph) -> set[str]:
    """Names a subgraph (If/Loop/Scan body) reads from its enclosing scopes."""
    reads, local = set(), {i.name for i in graph.input} | {i.name for i in graph.initializer}
    local |= {i.values.name for i in graph.sparse_initializer}
    for n in graph.node:
        reads.update(node_reads(n))
        local.update(o for o in n.output if o)
    return reads - local


def node_reads(node) -> set[str]:
    """A node's inputs, plus the outer-scope names read by its subgraphs (as the node's own)."""
    reads = {i for i in node.input if i}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            reads |= _subgraph_reads(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                reads |= _subgraph_reads(g)
    return reads


class Segmenter:
    """Cuts a model's node list at given node indices and builds the pieces as ONNX models."""

    def __init__(self, model: onnx.ModelProto, keep: tuple = ()):
        """keep: names wanted after the last node (counted as read there)."""
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.sparse = {i.values.name: i for i in g.sparse_initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits and i.name not in self.sparse]
        self.reads = [node_reads(n) for n in self.nodes]
        self.const_nodes = {n.output[0]: n for n in self.nodes if _is_const_node(n)}
        self.producer: dict[str, int] = {}
        for k, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = k
        # last node index (and subgraph reads count for their outer node) reading each name
        self.last_read: dict[str, int] = {}
        for k, r in enumerate(self.reads):
            for name in r:
                self.last_read[name] = k
        for name in keep:
            self.last_read[name] = len(self.nodes)
        self.types = {v.name: v for v in list(g.value_info) + list(g.output)}

    def carried(self, name: str) -> bool:
        """Values that travel between segments: node outputs (not Constants) and graph inputs."""
        return (name not in self.inits and name not in self.sparse and name not in self.const_nodes
                and (name in self.producer or name in self.graph_inputs))

    def boundary(self, cut: int) -> list[str]:
        """Tensors produced before node `cut` (graph inputs included) and read at or after it."""
        out = [name for name in self.graph_inputs if self.last_read.get(name, -1) >= cut]
        seen = set(out)
        for k in range(min(cut, len(self.nodes))):
            for o in self.nodes[k].output:
                if o and o not in seen and self.carried(o) and self.last_read.get(o, -1) >= cut:
                    out.append(o)
                    seen.add(o)
        return out

    def segment_reads(self, start: int, end: int) -> set[str]:
        return set().union(*self.reads[start:end]) if end > start else set()

    def build(self, start: int, end: int, outputs: list[str], input_types: dict[str, int],
              substitutions: dict[int, TensorProto] | None = None) -> onnx.ModelProto:
        """Model of nodes [start, end): inputs = the carried tensors they read that are produced
        before `start` (element types from `input_types`), outputs = `outputs`; substitutions
        maps a node index to an initializer that replaces that node's input 1."""
        substitutions = substitutions or {}
        nodes, extra = [], []
        for k in range(start, end):
            node = self.nodes[k]
            if k in substitutions:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.input[1] = substitutions[k].name
                extra.append(substitutions[k])
                node = copy
            nodes.append(node)
        reads = set().union(*(node_reads(n) for n in nodes)) if nodes else set()
        produced = {o for n in nodes for o in n.output if o}
        consts = [self.const_nodes[r] for r in sorted(reads) if r in self.const_nodes and r not in produced]
        inputs = [r for r in sorted(reads) if r not in produced and self.carried(r)]
        missing = [r for r in inputs if r not in input_types]
        if missing:
            raise ValueError(f"segment [{start}, {end}): no value for its input(s) {missing[:5]}")
        inits = [self.inits[r] for r in sorted(reads) if r in self.inits]
        sparse = [self.sparse[r] for r in sorted(reads) if r in self.sparse]
        g = helper.make_graph(
            consts + nodes, f"segment_{start}_{end}",
            [helper.make_tensor_value_info(r, input_types[r], None) for r in inputs],
            [self.types[o] if o in self.types else helper.make_empty_tensor_value_info(o) for o in outputs],
            inits + extra, sparse_initializer=sparse)
        m = helper.make_model(g, opset_imports=list(self.model.opset_import))
        m.ir_version = self.model.ir_version
        m.functions.extend(self.model.functions)
        return m
