"""Read the quantized layers back from a quipc ONNX model (QuipLinear nodes), e.g. to run
the very same layers on the torch reference path (QuipLinearRef) and compare."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.transforms import Transform


def layers_from_onnx(path: str | Path) -> dict[str, QuantizedLinear]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    layers = {}
    for node in model.graph.node:
        if node.op_type != "QuipLinear":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        names = dict(zip(_input_names(node.overload), node.input))
        arr = {k: numpy_helper.to_array(inits[v]) for k, v in names.items() if k != "x"}
        m, n = int(attrs["out_features"]), int(attrs["in_features"])

        def transform(side: str, size: int, kind: str) -> Transform:
            mats = [arr[k] for k in sorted(arr) if k.startswith(f"{side}_factor")]
            orders = tuple(int(x.shape[0]) for x in mats)
            signs = None
            if side == "out" and "out_sign_bits" in arr:
                signs = np.where(np.unpackbits(arr["out_sign_bits"])[:size] == 1, -1, 1).astype(np.int8)
            t = Transform(kind, size, orders, 0 if kind == "kron" else None, signs)
            t._mats = [np.asarray(x, np.float32) for x in mats]
            return t

        kind_in = attrs["in_transform"].decode() if isinstance(attrs["in_transform"], bytes) else attrs["in_transform"]
        kind_out = attrs["out_transform"].decode() if isinstance(attrs["out_transform"], bytes) else attrs["out_transform"]
        name = node.name[: -len(".QuipLinear")] if node.name.endswith(".QuipLinear") else node.name
        layers[name] = QuantizedLinear(name, m, n, int(attrs["bits"]), arr["codes"], arr["scale"], arr["zero"],
                                       transform("in", n, kind_in), transform("out", m, kind_out),
                                       arr.get("in_scale"), arr.get("bias"))
    return layers


def _input_names(overload: str) -> list[str]:
    from .quip_function import Variant

    parts = overload.split("_")
    mode, bits, k = parts[0], int(parts[1][1:]), parts[2][1:]
    flags = parts[3] if len(parts) > 3 and parts[3] != "r3" else ""
    return Variant(mode, bits, int(k[0]), int(k[1]), "s" in flags, "o" in flags, "b" in flags).input_names()


def torch_model_with(hf_model, layers: dict[str, QuantizedLinear]):
    """hf_model with each named linear replaced by QuipLinearRef of the given layer."""
    from quipc_runtime.modules import QuipLinearRef

    for name, layer in layers.items():
        hf_model.set_submodule(name, QuipLinearRef(layer))
    return hf_model.eval()
