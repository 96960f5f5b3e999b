"""A trellis lm_head run by the 4-bit grid kernels, on its rows rounded to 8 bits.

TVM's trellis GEMV assembles each weight's 12-bit state and loads its code value one scalar
load at a time (tir_trellis_linear), ~3.5x the e8p GEMV per weight; on SmolLM2's 49152 x 576
head that is most of a decoded token. The build instead lowers a trellis head as the TVM-only
format "int8x2" (tir_int8x2): W' rounded per row to 8 bits (quipc_runtime.int8_rows, as the
C++ kernels' decode GEMV does), two 4-bit grid planes summed by the grid GEMV and GEMM. A weight
moves by at most max_j |W'_ij| / 254; the build stores 8 bits a weight of the head instead of
the trellis code's 2-4, and an embedding that shares the head decodes from the same planes.
The decoder blocks keep the trellis kernels (there the code's bytes are the build's size).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from quipc_runtime.int8_rows import int8_planes

HEAD = "lm_head"


def applies(layer) -> bool:
    return layer is not None and layer.format == "trellis"


def as_int8x2(layer):
    """The layer relabelled "int8x2": codes (2, m, n) uint8 nibbles (hi, lo), scale (m, 2),
    zero (m,), for the TVM lowering only (the artifact's layer is left as it is)."""
    if not applies(layer):
        raise ValueError(f"layer {layer.name}: only trellis layers are rounded to int8 planes "
                         f"(got {layer.format!r})")
    hi, lo, scale, zero = int8_planes(layer.rotated_weight())
    return dataclasses.replace(layer, format="int8x2", bits=4, codes=np.stack([hi, lo]),
                               scale=scale, zero=zero)


def head_as_int8(layers: dict) -> dict:
    """name -> layer, the trellis lm_head (if any) as "int8x2"."""
    head = layers.get(HEAD)
    return {**layers, HEAD: as_int8x2(head)} if applies(head) else layers
