"""A small helper for writing ONNX graphs and function bodies node by node."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 21              # default ONNX domain
MS_DOMAIN = "com.microsoft"
QUIPC_DOMAIN = "ai.quipc"
QUIPC_DOMAIN_VERSION = 1


class Builder:
    """Collects nodes (and, for a graph, initializers). Names get a prefix and a counter so
    that bodies emitted many times into one graph never collide."""

    def __init__(self, prefix: str = "", function: bool = False, opset: int = OPSET):
        self.prefix = prefix
        self.function = function   # inside a FunctionProto: no initializers, attribute refs
        self.opset = opset         # default-domain opset the nodes are written for
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._tables: dict[str, str] = {}
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", out_name: str | None = None,
           **attrs):
        outs = [out_name] if out_name and outputs == 1 else [self.name(op_type) for _ in range(outputs)]
        node = helper.make_node(op_type, list(inputs), outs, name=self.name(f"n_{op_type}"),
                                domain=domain or None, **{k: v for k, v in attrs.items() if not isinstance(v, Ref)})
        for key, ref in attrs.items():
            if isinstance(ref, Ref):
                node.attribute.append(ref.proto(key))
        self.nodes.append(node)
        return outs[0] if outputs == 1 else outs

    # constants --------------------------------------------------------------------------
    def const(self, value, dtype=None, hint: str = "c") -> str:
        """A small constant (a Constant node, so it also works inside functions)."""
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=numpy_helper.from_array(arr, self.name(hint)))

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64), hint="i")

    def attr_int(self, attr: str, value: int) -> str:
        """A 1-D int64 tensor [value]: a literal in a graph, the caller's attribute in a function."""
        if self.function:
            t = self.op("Constant", value_int=Ref(attr, onnx.AttributeProto.INT))
            return self.op("Reshape", t, self.ints([1]))
        return self.ints([value])

    def attr_ints(self, attr: str, values) -> str:
        """A 1-D int64 tensor: a literal in a graph, the caller's ints attribute in a function."""
        if self.function:
            return self.op("Constant", value_ints=Ref(attr, onnx.AttributeProto.INTS))
        return self.ints(list(values))

    def table(self, name: str, arr: np.ndarray) -> str:
        """A constant read by many nodes: one Constant per function body, one shared
        initializer `name` in a graph (the same array for the same name, by contract)."""
        if not self.function:
            return self.initializer(name, arr)
        if name not in self._tables:
            self._tables[name] = self.const(arr, hint="table")
        return self._tables[name]

    def initializer(self, name: str, arr: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name


class Ref:
    """An attribute that refers to the enclosing function's attribute (ref_attr_name)."""

    def __init__(self, ref: str, kind: int):
        self.ref, self.kind = ref, kind

    def proto(self, key: str) -> onnx.AttributeProto:
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = key, self.ref, self.kind
        return a
