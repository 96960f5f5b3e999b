"""Which nodes of an ONNX language model quipc quantizes: the input read and checked (opset,
external data, onnx.checker), and each MatMul/Gemm whose weight is a constant 2-D float matrix,
as a Target with its weight as (out, in). The output projection onto the vocabulary (lm_head,
tied to an embedding table or of the vocabulary's width) is skipped unless asked for."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_calibration import embedding_tables

MIN_OPSET = 13


def load_checked(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{path} is not a readable ONNX model (not ONNX, or truncated): {e}") from None
    if not model.graph.node:
        raise ValueError(f"{path} is not an ONNX model with a graph (no nodes): not ONNX, or truncated")
    opset = {o.domain: o.version for o in model.opset_import}.get("", opset_default(model))
    if opset < MIN_OPSET:
        raise ValueError(f"{path} uses opset {opset}; quipc needs opset >= {MIN_OPSET} "
                         "(convert it with onnx.version_converter or re-export it)")
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            data = path.parent / info.get("location", "")
            if not data.is_file():
                raise FileNotFoundError(f"{path}: external data file {data} (tensor {init.name}) is missing")
            need = int(info.get("offset", 0)) + int(info.get("length", 0))
            if data.stat().st_size < need:
                raise ValueError(f"{path}: external data file {data} is truncated "
                                 f"(tensor {init.name} needs {need} bytes, file has {data.stat().st_size})")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model if model.ByteSize() < 2 ** 31 - 1 else str(path))
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:
        raise ValueError(f"{path} fails onnx.checker: {e}") from None
    return model


def opset_default(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class Target:
    """One MatMul/Gemm with a constant weight: y = x W^T (+ bias)."""

    def __init__(self, node, index, weight, bias, weight_names, name):
        self.node, self.index, self.weight, self.bias = node, index, weight, bias
        self.weight_names, self.name = weight_names, name

    @property
    def x(self) -> str:
        return self.node.input[0]


def find_targets(model: onnx.ModelProto, quantize_lm_head: bool = False) -> tuple[list[Target], list[str]]:
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gathered = set(embedding_tables(model))
    vocab = {int(inits[e].dims[0]) for e in gathered if len(inits[e].dims) == 2}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def const_weight(name: str):
        """(array, names it depends on, transposed?) for an initializer, maybe behind a Transpose."""
        if name in inits:
            return numpy_helper.to_array(inits[name]), [name], False
        if name in const_nodes:
            attr = {a.name: a for a in const_nodes[name].attribute}
            if "value" in attr:
                return numpy_helper.to_array(attr["value"].t), [], False
        prod = producers.get(name)
        if prod is not None and prod.op_type == "Transpose" and prod.input[0] in inits:
            perm = [a.ints for a in prod.attribute if a.name == "perm"]
            if not perm or list(perm[0]) == [1, 0]:
                return numpy_helper.to_array(inits[prod.input[0]]), [prod.input[0]], True
        return None, [], False

    targets, skipped, seen_names = [], [], set()
    for idx, node in enumerate(g.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        arr, deps, transposed = const_weight(node.input[1])
        label = node.name or node.output[0]
        if arr is None:
            skipped.append(f"{label}: weight is not constant")
            continue
        if arr.ndim != 2 or arr.dtype not in (np.float32, np.float16, np.float64) and str(arr.dtype) != "bfloat16":
            skipped.append(f"{label}: weight is not a 2-D float matrix")
            continue
        bias = None
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                skipped.append(f"{label}: Gemm with transA or alpha != 1")
                continue
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] not in inits or attrs.get("beta", 1.0) != 1.0:
                    skipped.append(f"{label}: Gemm bias is not a constant")
                    continue
                bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
            trans_b = bool(attrs.get("transB", 0))
        else:
            trans_b = False
        # weight as (out, in): MatMul's B is (in, out)
        w = arr if (trans_b != transposed) else arr.T
        if bias is not None and bias.shape[0] != w.shape[0]:
            skipped.append(f"{label}: bias does not match the output size")
            continue
        tied = any(d in gathered for d in deps)
        if (tied or w.shape[0] in vocab) and not quantize_lm_head:
            skipped.append(f"{label}: output projection onto the vocabulary (lm_head) kept in float")
            continue
        name = _layer_name(deps[0] if deps else label)
        while name in seen_names:
            name += "_"
        seen_names.add(name)
        targets.append(Target(node, idx, np.ascontiguousarray(w, dtype=np.float32), bias, deps, name))
    return targets, skipped


def _layer_name(weight_name: str) -> str:
    for suffix in (".weight_t", ".weight", "_weight"):
        if weight_name.endswith(suffix):
            return weight_name[: -len(suffix)]
    return weight_name
