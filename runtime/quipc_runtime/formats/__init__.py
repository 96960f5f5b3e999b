"""Code formats: how a layer's rotated weight W' is stored, and its exact meaning.

Every format stores `codes` as (m, packed_row_bytes(n, bits)) uint8, i.e. `bits` bytes per
group of 8 weights of a row, and a per-row fp16 `scale` (one column per stage); what the
bytes of a group mean is the format's. A format is one module here that registers itself:
its tensor shapes, its reference decoder (numpy, the definition every backend must
reproduce) and the bits it supports. Adding a format is adding a module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class CodeFormat:
    name: str
    bits: tuple[int, ...]                       # bit widths the format stores
    tensor_specs: Callable[[int, int, int], dict]   # (m, n, bits) -> {key: (shape, dtype)}
    decode: Callable[[dict, int, int], np.ndarray]  # (tensors, bits, n) -> W' (m, n) float32
    check_shape: Callable[..., None]            # (n, m=None): ValueError for an unsupported shape
    describe: str
    row_group: int = 1    # rows that decode only together (trellis: a tile's 16 rows share a stream)

    def decode_rows(self, tensors: dict, bits: int, n: int, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (1-D) of W', float32 (len(ids), n), decoding only the row groups they lie in
        (an embedding lookup from a head's codes)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        g = self.row_group
        if g == 1:
            return self.decode({k: v[ids] for k, v in tensors.items()}, bits, n)
        # each group the ids touch decoded once (the whole table of a 49152-row trellis head:
        # 49152 rows, not 16 copies of each group, which took 9 GB)
        groups, where = np.unique(ids // g, return_inverse=True)
        members = (groups[:, None] * g + np.arange(g)[None, :]).reshape(-1)
        rows = self.decode({k: v[members] for k, v in tensors.items()}, bits, n)
        return rows[where.reshape(-1) * g + ids % g]

    def check_bits(self, bits: int) -> None:
        if bits not in self.bits:
            raise ValueError(f"format {self.name!r} stores {'/'.join(map(str, self.bits))} bits, not {bits}")

    def check(self, bits: int, n: int, m: int | None = None) -> None:
        """Refuse a bit width or a shape (n columns, m rows when known) the format cannot store."""
        self.check_bits(bits)
        self.check_shape(n, m)


FORMATS: dict[str, CodeFormat] = {}
DEFAULT_FORMAT = "grid"  # what a layer without a "format" field (artifacts before v2) holds


def register_format(fmt: CodeFormat) -> CodeFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> CodeFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown code format {name!r}; this quipc knows {sorted(FORMATS)}")
    return fmt


from . import e8p, grid, trellis  # noqa: E402,F401  (register the built-in formats)


class UnsupportedFormatError(ValueError):
    """A backend was handed a layer in a code format it has no lowering for."""


def require_format(layer, supported: tuple[str, ...], backend: str) -> None:
    """Refuse, naming the format, a layer that `backend` cannot run."""
    if layer.format not in supported:
        raise UnsupportedFormatError(
            f"{backend} runs the code format(s) {', '.join(supported)}; layer {layer.name} is stored "
            f"as {layer.format!r}. Run this artifact with quipc.load(..., backend='reference') "
            f"(the torch path), or compile with --format {supported[0]}")
