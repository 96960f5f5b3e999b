"""A 2-bit "e8p" layer run by the 4-bit grid kernel.

Every coordinate of an E8P point is an odd multiple of 1/4 (a source coordinate +-1/2, 3/2 or
5/2, the shift +-1/4), between -11/4 and 11/4, so E8P[a][c] = q / 2 - 15/4 with q in 2..13.
A 2-bit e8p row, W'[i] = scale[i] * E8P[...], is then exactly the grid format's row at 4 bits:
code q, scale[i] / 2, zero -15/4 * scale[i] (kept in fp32 here, where the grid format stores
fp16, so the weights are the e8p layer's to the bit). The grid GEMV decodes a weight with a
shift and a mask from a nibble plane and spends one FMA on it, where the e8p GEMV spends two
table lookups per group of 8; the build stores 4 bits per weight of these layers instead of 2.
A 4-bit e8p layer (two E8P stages, each with its own scale) runs as two 4-bit grid stages
(tir_e8p4_grid, format "grid4x2": 8 bits per weight in the build); 3-bit layers (an E8 one-bit
second stage, not on the grid) keep the e8p kernel.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from quipc_runtime.formats.e8p import split_indices
from quipc_runtime.formats.lattice import e8p_table
from quipc_runtime.packing import pack


KERNELS = ("grid4", "codebook")   # --tvm-e8p: this module's lowering, or the e8p kernel (tir_e8p_linear)


def nibbles(idx: np.ndarray, m: int, n: int) -> np.ndarray:
    """(m, n) uint8 grid codes q of one E8P stage's (m, n/8) indices: E8P = q/2 - 15/4, exact."""
    return (e8p_table()[idx].reshape(m, n) * np.float32(2) + np.float32(7.5)).astype(np.uint8)


def applies(layer) -> bool:
    return layer.format == "e8p" and layer.bits == 2


def as_grid4(layer):
    """The layer as a 4-bit grid layer with the same weights (fp32 scale and zero), for the
    TVM lowering only: the artifact's layer is left as it is."""
    if not applies(layer):
        raise ValueError(f"layer {layer.name}: only 2-bit e8p layers map onto the 4-bit grid "
                         f"(got {layer.bits}-bit {layer.format!r})")
    q = nibbles(split_indices(layer.codes, 2)[0], layer.out_features, layer.in_features)
    scale = layer.scale[:, 0].astype(np.float32)
    return dataclasses.replace(layer, format="grid", bits=4, codes=pack(q, 4),
                               scale=scale * np.float32(0.5), zero=scale * np.float32(-3.75))


def as_grid4x2(layer):
    """A 4-bit e8p layer (two E8P stages) relabelled "grid4x2", the TVM-only format that
    tir_e8p4_grid lowers as two 4-bit grid stages (its codes and scales stay the e8p ones)."""
    if not (layer.format == "e8p" and layer.bits == 4):
        raise ValueError(f"layer {layer.name}: only 4-bit e8p layers map onto two 4-bit grid stages")
    return dataclasses.replace(layer, format="grid4x2")


def _kernel_layer(layer):
    if applies(layer):
        return as_grid4(layer)
    return as_grid4x2(layer) if layer.format == "e8p" and layer.bits == 4 else layer


def kernel_layers(layers: dict, keep=None) -> dict:
    """name -> the layer the TVM build lowers: 2-bit e8p layers as the 4-bit grid, 4-bit ones as
    two 4-bit grid stages, except `keep` (a head whose codes the embedding decodes keeps its
    format, so they are stored once)."""
    return {k: v if v is keep else _kernel_layer(v) for k, v in layers.items()}
