"""TIR lowering of the TVM-only format "int8x2": a layer's W' rounded per row to 8 bits
(trellis_as_int8.as_int8x2) as two 4-bit grid planes,

    W'[i, j] = scale[0, i] hi[i, j] + scale[1, i] lo[i, j] + zero[i]     (16 step, step, -128 step)

computed exactly as the two-stage "grid4x2" layers (tir_e8p4_grid: the grid GEMV once per
plane, int8 activations included; the prefill's dequantized 16-row tiles), from these planes.
"""
from __future__ import annotations

import numpy as np

from .tir_e8p4_grid import (SHARED, param_names, param_shapes, placeholders, quip_linear_te,  # noqa: F401
                            two_plane_params)
from .tir_quip_linear import LinearSpec

# the lowering interface (lowering.py): the two-plane kernel's, with this format's parameters
__all__ = ["SHARED", "param_names", "param_shapes", "placeholders", "quip_linear_te", "linear_params"]


def linear_params(layer, spec: LinearSpec | None = None) -> dict[str, np.ndarray]:
    spec = spec or LinearSpec.of(layer)
    if spec.format != "int8x2":
        raise ValueError(f"layer {layer.name}: the int8x2 lowering takes a layer relabelled by "
                         "trellis_as_int8.as_int8x2")
    return two_plane_params(layer, spec, layer.codes, layer.scale.T, layer.zero)
