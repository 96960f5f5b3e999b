"""Read the quantized layers back from a quipc ONNX model (QuipLinear and QuipLinearGroup
nodes), e.g. to run the very same layers on the torch reference path (QuipLinearRef) and compare.
Transforms are stored as their Kronecker factors whatever form the body applies them in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.transforms import Transform

from .builder import QUIPC_DOMAIN
from .variants import GroupVariant, Variant, side_inputs


def layers_from_onnx(path: str | Path) -> dict[str, QuantizedLinear]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    layers = {}
    for node in model.graph.node:
        if node.domain != QUIPC_DOMAIN or node.op_type not in ("QuipLinear", "QuipLinearGroup"):
            continue
        attrs = {a.name: _text(helper.get_attribute_value(a)) for a in node.attribute}
        if node.op_type == "QuipLinear":
            v = Variant.parse(node.overload)
            arr = _arrays(dict(zip(v.input_names(), node.input)), inits)
            name = node.name[: -len(".QuipLinear")] if node.name.endswith(".QuipLinear") else node.name
            layers[name] = _layer(name, v, arr, int(attrs["out_features"]), attrs, attrs["out_transform"])
            continue
        g = GroupVariant.parse(node.overload)
        named = dict(zip(g.input_names(), node.input))
        shared = _arrays({k: named[k] for k in g.shared_names()}, inits)
        for i, (v, name) in enumerate(zip(g.parts, attrs["layer_names"])):
            arr = dict(shared, **_arrays({k.split(".", 1)[1]: named[k] for k in g.part_names(i)}, inits))
            layers[name] = _layer(name, v, arr, int(attrs["out_split"][i]), attrs, attrs["out_transforms"][i])
    return layers


def _text(value):
    """Attribute strings come back as bytes."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [x.decode() for x in value]
    return value


def _arrays(names: dict[str, str], inits: dict) -> dict[str, np.ndarray]:
    return {k: numpy_helper.to_array(inits[v]).copy() for k, v in names.items() if k != "x"}   # writable


def _transform(v: Variant, arr: dict, side: str, size: int, kind: str) -> Transform:
    form, count = (v.in_form, v.n_in) if side == "in" else (v.out_form, v.n_out)
    mats = [arr[k] for k in side_inputs(side, form, count)]
    signs = None
    if side == "out" and "out_sign_bits" in arr:
        signs = np.where(np.unpackbits(arr["out_sign_bits"])[:size] == 1, -1, 1).astype(np.int8)
    t = Transform(kind, size, tuple(int(x.shape[0]) for x in mats), 0 if kind == "kron" else None, signs)
    t._mats = [np.ascontiguousarray(x, np.float32) for x in mats]
    return t


def _layer(name: str, v: Variant, arr: dict, m: int, attrs: dict, kind_out: str) -> QuantizedLinear:
    n = int(attrs["in_features"])
    fmt = attrs.get("format", "grid")
    if fmt != v.fmt:
        raise ValueError(f"layer {name}: the node's format attribute {fmt!r} disagrees with its layout {v.fmt!r}")
    layer = QuantizedLinear(name, m, n, int(attrs["bits"]), arr["codes"], arr["scale"], arr.get("zero"),
                            _transform(v, arr, "in", n, attrs["in_transform"]),
                            _transform(v, arr, "out", m, kind_out), arr.get("in_scale"), arr.get("bias"), format=fmt)
    layer.validate()   # a known format, and its tensors' shapes and dtypes
    return layer


def torch_model_with(hf_model, layers: dict[str, QuantizedLinear]):
    """hf_model with each named linear replaced by QuipLinearRef of the given layer."""
    from quipc_runtime.modules import QuipLinearRef

    for name, layer in layers.items():
        hf_model.set_submodule(name, QuipLinearRef(layer))
    return hf_model.eval()
