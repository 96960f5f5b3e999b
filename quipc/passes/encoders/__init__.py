"""Encoders: one per code format (quipc_runtime.formats), registered by the format's name.

An encoder rounds the (rotated) weight W' of one layer into its format: with a Hessian it
rounds adaptively (LDLQ / BlockLDLQ), without one (rtn) to the nearest code. It returns
the stored tensors and the values they decode to, so that the proxy loss is measured on
exactly what the artifact holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Encoded:
    codes: np.ndarray            # (m, packed_row_bytes) uint8
    scale: np.ndarray            # float16, the format's shape
    zero: np.ndarray | None      # float16 or None
    values: torch.Tensor         # (m, n) what the stored tensors decode to
    proxy_loss: float | None = None  # tr(E H E^T), E = values - W, where the encoder overwrote H (consume)


ENCODERS: dict[str, Callable] = {}
CONSUMERS: set[str] = set()   # encoders that may factor H in its own memory: fn(w, h, cfg, consume=...)
# encoders whose rows are rounded independently (per-row scales, feedback along the columns): any
# run of whole rows encodes to the same floats alone as within the whole matrix (Encoded fields
# stacked on their first axis), so ranks may share the rows (passes/spread.encode_rows)
ROW_SEPARABLE: set[str] = set()


def register_encoder(name: str, consumes_hessian: bool = False, row_separable: bool = False):
    def wrap(fn):
        ENCODERS[name] = fn
        if consumes_hessian:
            CONSUMERS.add(name)
        if row_separable:
            ROW_SEPARABLE.add(name)
        return fn
    return wrap


# Format "auto" (quipc compile's default): per layer, the first of these that stores its
# shape: trellis (lowest error; whole 16x16 tiles), else e8p (rows of groups of 8), else grid.
AUTO = "auto"
AUTO_ORDER = ("trellis", "e8p", "grid")


def resolve_format(name: str, bits: int, n: int, m: int) -> str:
    """The code format a layer of m rows x n columns is stored in under format `name`."""
    if name != AUTO:
        return name
    from quipc_runtime.formats import get_format

    for fmt in AUTO_ORDER:
        try:
            get_format(fmt).check(bits, n, m)
        except ValueError:
            continue
        return fmt
    raise ValueError(f"no code format stores a {m}x{n} layer at {bits} bits")


def encode(fmt: str, w: torch.Tensor, h: torch.Tensor | None, cfg, consume: bool = False) -> Encoded:
    """consume: the caller reads h no more; an encoder that can factors it in its own memory
    (h destroyed) and then reports the proxy loss itself (Encoded.proxy_loss)."""
    if fmt not in ENCODERS:
        raise ValueError(f"no encoder for code format {fmt!r}; known: {sorted(ENCODERS)}")
    if consume and h is not None and fmt in CONSUMERS:
        return ENCODERS[fmt](w, h, cfg, consume=True)
    return ENCODERS[fmt](w, h, cfg)


from . import e8p, grid, trellis  # noqa: E402,F401
