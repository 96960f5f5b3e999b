"""Trellis layers run by the 4-bit grid kernels, on their rows rounded to 8 bits.

TVM's trellis GEMV assembles each weight's 12-bit state and loads its code value one scalar
load at a time (tir_trellis_linear), ~3.5x the e8p GEMV per weight; on SmolLM2's 49152 x 576
head that is most of a decoded token. The build instead lowers a trellis layer as the TVM-only
format "int8x2" (tir_int8x2): W' rounded per row to 8 bits (quipc_runtime.int8_rows, as the
C++ kernels' decode GEMV does), two 4-bit grid planes summed by the grid GEMV and GEMM. A weight
moves by at most max_j |W'_ij| / 254; the build stores 8 bits a weight instead of the trellis
code's 2-4, and an embedding that shares the head decodes from the same planes.

The head always runs so. The decoder blocks (`--tvm-trellis`, KERNELS): "int8" (the default)
the same way, as a 4-bit e8p layer already runs as two grid planes (e8p_as_grid), or "codes"
(the trellis kernels on the codes: the smallest build, ~3x slower decode).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from quipc_runtime.formats.trellis import FORMAT_NAMES as TRELLIS_FORMATS
from quipc_runtime.int8_rows import int8_planes, trellis_rows_as_int8

HEAD = "lm_head"
KERNELS = ("int8", "codes")   # --tvm-trellis: the blocks on 8-bit planes, or on their codes


def applies(layer) -> bool:
    return layer is not None and layer.format in TRELLIS_FORMATS


def as_int8x2(layer):
    """The layer relabelled "int8x2": codes (2, m, n) uint8 nibbles (hi, lo), scale (m, 2),
    zero (m,), for the TVM lowering only (the artifact's layer is left as it is)."""
    if not applies(layer):
        raise ValueError(f"layer {layer.name}: only trellis layers are rounded to int8 planes "
                         f"(got {layer.format!r})")
    hi, lo, scale, zero = int8_planes(*trellis_rows_as_int8(layer))
    return dataclasses.replace(layer, format="int8x2", bits=4, codes=np.stack([hi, lo]),
                               scale=scale, zero=zero)


def head_as_int8(layers: dict) -> dict:
    """name -> layer, the trellis lm_head (if any) as "int8x2"."""
    head = layers.get(HEAD)
    return {**layers, HEAD: as_int8x2(head)} if applies(head) else layers


def kernel_layers(layers: dict, kernel: str = "int8") -> dict:
    """name -> layer with the head (kernel "codes") or every trellis layer (kernel "int8") as "int8x2"."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown trellis kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    if kernel == "codes":
        return head_as_int8(layers)
    return {name: as_int8x2(layer) if applies(layer) else layer for name, layer in layers.items()}
