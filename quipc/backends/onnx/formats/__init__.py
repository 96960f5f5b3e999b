"""Per code format, how QuipLinear's body computes W' z (one lowering module per format,
looked up by the format's name, as quipc_runtime.formats holds one meaning per format).

A lowering gives the op's weight inputs (initializers, in order after x), picks the body's
weight-product mode for a layer, and writes that product into a Builder. Everything else in
the body (in_scale, transforms, signs, bias, grouping) is the same for every format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from quipc_runtime.formats import require_format


@dataclass(frozen=True)
class Lowering:
    name: str
    weight_keys: tuple[str, ...]    # the layer's arrays the op takes, after x (e.g. codes, scale)
    # (layer, ops, native_2bit) -> (mode, MatMulNBits block size or 0); mode names the body
    plan: Callable
    # (b, v, z, weights by key, m, lit) -> W' z for the m rows (m: a 1-D int64 tensor name)
    weight_product: Callable
    # (b, bits, weights by key, m, lit) -> W' (m, n) float32 with standard ops: the "unpack" mode's
    # matrix, and the rows of a tied head that an embedding lookup decodes (backends/onnx/embedding.py)
    dequantize: Callable
    ms_modes: tuple[str, ...] = ()  # modes whose body uses com.microsoft ops (MatMulNBits)


LOWERINGS: dict[str, Lowering] = {}


def register_lowering(low: Lowering) -> Lowering:
    LOWERINGS[low.name] = low
    return low


def get_lowering(name: str) -> Lowering:
    low = LOWERINGS.get(name)
    if low is None:
        raise ValueError(f"the ONNX backend has no lowering for code format {name!r} "
                         f"(it lowers {', '.join(sorted(LOWERINGS))})")
    return low


def lowering_for(layer) -> Lowering:
    """The layer's lowering; refuses (naming the format) one the ONNX backend cannot run."""
    require_format(layer, tuple(sorted(LOWERINGS, key=lambda k: k != "grid")), "the ONNX backend")
    return LOWERINGS[layer.format]


from . import e8p, grid, trellis  # noqa: E402,F401  (register the built-in lowerings)
