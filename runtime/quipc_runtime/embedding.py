"""Quantized token embeddings: a row gather + dequantize, never the whole fp32 table.

Two stored forms (the manifest's "embedding" record, `kind`):
- "head": a tied model's one table is the quantized lm_head. The head is stored with an
  identity output transform, so row i of its effective weight is
      E[i] = (W'[i] @ K_in) * in_scale,   W'[i] decoded by the head's code format
  (K_in the Kronecker part of the input transform, signs folded into in_scale): a lookup
  gathers the code rows of the token ids (for trellis the 16-row tiles they lie in), decodes
  them and applies K_in^T to each.
- "table": an integer table of its own: codes of `bits` (8 or 4) bits per entry, one fp16
  scale and zero per group of `group` consecutive entries of a row,
      E[i, j] = scale[i, j // group] * code[i, j] + zero[i, j // group].
  4-bit codes are two per byte, low nibble first.
("dense": the table stays in dense.safetensors, in the dtype recorded there.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import get_format
from .layer import QuantizedLinear, tensors_checksum

TABLE_BITS = (4, 8)


# --- the integer table ------------------------------------------------------------------
@dataclass
class EmbeddingTable:
    name: str
    rows: int
    dim: int
    bits: int
    group: int
    codes: np.ndarray   # (rows, dim) uint8 for 8 bits, (rows, ceil(dim / 2)) for 4 bits
    scale: np.ndarray   # (rows, dim // group) float16
    zero: np.ndarray    # (rows, dim // group) float16

    def validate(self) -> None:
        if self.bits not in TABLE_BITS:
            raise ValueError(f"embedding {self.name}: unsupported table bits {self.bits}; "
                             f"expected one of {TABLE_BITS}")
        if self.group < 1 or self.dim % self.group:
            raise ValueError(f"embedding {self.name}: group {self.group} does not divide dim {self.dim}")
        width = self.dim if self.bits == 8 else -(-self.dim // 2)
        expect = {"codes": ((self.rows, width), np.uint8),
                  "scale": ((self.rows, self.dim // self.group), np.float16),
                  "zero": ((self.rows, self.dim // self.group), np.float16)}
        for key, (shape, dtype) in expect.items():
            arr = getattr(self, key)
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"embedding {self.name}: {key} has shape {arr.shape} {arr.dtype}, "
                                 f"expected {shape} {np.dtype(dtype)}")
        for key in ("scale", "zero"):
            if not np.isfinite(getattr(self, key)).all():
                raise ValueError(f"embedding {self.name}: {key} holds NaN or Inf")

    def _codes(self, ids: np.ndarray) -> np.ndarray:
        raw = self.codes[ids]
        if self.bits == 8:
            return raw
        wide = np.empty(raw.shape[:-1] + (2 * raw.shape[-1],), np.uint8)
        wide[..., 0::2] = raw & 0x0F
        wide[..., 1::2] = raw >> 4
        return wide[..., :self.dim]

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows (..., dim) of the token ids (any integer array)."""
        ids = np.asarray(ids)
        check_ids(ids, self.rows, self.name)
        codes = self._codes(ids).astype(np.float32)
        groups = codes.reshape(*ids.shape, self.dim // self.group, self.group)
        out = groups * self.scale[ids].astype(np.float32)[..., None] + self.zero[ids].astype(np.float32)[..., None]
        return out.reshape(*ids.shape, self.dim)

    def dequantize(self) -> np.ndarray:
        return self.gather(np.arange(self.rows))

    def tensors(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero}

    def storage_bits(self) -> int:
        return 8 * sum(a.nbytes for a in self.tensors().values())

    def checksum(self) -> str:
        return tensors_checksum(self.tensors())

    def meta(self) -> dict:
        return {"kind": "table", "module": self.name, "shape": [self.rows, self.dim],
                "bits": self.bits, "group": self.group}

    @staticmethod
    def quantize(name: str, weight: np.ndarray, bits: int, group: int | None = None) -> "EmbeddingTable":
        """Nearest rounding on each group's min-max grid (fp16 scale and zero, rounded first,
        so the codes are chosen for exactly the stored values)."""
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim != 2 or not np.isfinite(w).all():
            raise ValueError(f"embedding {name}: expected a finite 2-D table, got shape {w.shape}")
        if bits not in TABLE_BITS:
            raise ValueError(f"embedding {name}: unsupported table bits {bits}; expected one of {TABLE_BITS}")
        rows, dim = w.shape
        group = dim if group is None else group
        if group < 1 or dim % group:
            raise ValueError(f"embedding {name}: group {group} does not divide dim {dim}")
        g = w.reshape(rows, dim // group, group)
        lo, hi = g.min(axis=-1), g.max(axis=-1)
        maxq = (1 << bits) - 1
        scale = np.maximum((hi - lo) / maxq, 1e-6).astype(np.float16)
        scale = np.where(scale > 0, scale, np.float16(6.1e-5)).astype(np.float16)
        zero = lo.astype(np.float16)
        codes = np.clip(np.rint((g - zero.astype(np.float32)[..., None]) / scale.astype(np.float32)[..., None]),
                        0, maxq).astype(np.uint8).reshape(rows, dim)
        if bits == 4:
            if dim % 2:
                codes = np.concatenate([codes, np.zeros((rows, 1), np.uint8)], axis=1)
            codes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        table = EmbeddingTable(name, rows, dim, bits, group, np.ascontiguousarray(codes), scale, zero)
        table.validate()
        return table

    @staticmethod
    def from_storage(meta: dict, tensors: dict[str, np.ndarray]) -> "EmbeddingTable":
        rows, dim = (int(v) for v in meta["shape"])
        table = EmbeddingTable(meta["module"], rows, dim, int(meta["bits"]), int(meta["group"]),
                               tensors["codes"], tensors["scale"], tensors["zero"])
        table.validate()
        return table


# --- rows of a quantized head -------------------------------------------------------------
def check_shared_head(layer: QuantizedLinear) -> None:
    """A head whose codes can serve as the embedding table: identity output transform (row i
    of W' is row i of the head), no bias; any code format (its rows decode by row groups)."""
    if layer.t_out.kind != "identity" or layer.t_out.signs is not None:
        raise ValueError(f"layer {layer.name}: an embedding shared with the head needs the head's "
                         f"output transform to be the identity, not {layer.t_out.kind}")
    if layer.bias is not None:
        raise ValueError(f"layer {layer.name}: an embedding shared with the head needs a head without bias")


def head_rotated_rows(layer: QuantizedLinear, ids: np.ndarray) -> np.ndarray:
    """W'[ids] in float32, (k, n): the decoded code rows (the format's reference decoder, only
    the row groups of the ids), before the input transform."""
    ids = np.asarray(ids).reshape(-1)
    fmt, (m, n) = get_format(layer.format), (layer.out_features, layer.in_features)
    tensors = {key: getattr(layer, key) for key in fmt.tensor_specs(m, n, layer.bits)}
    return fmt.decode_rows(tensors, layer.bits, n, ids)


def head_rows(layer: QuantizedLinear, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of the head's effective weight (numpy reference; float32, shape ids.shape + (n,))."""
    check_shared_head(layer)
    ids = np.asarray(ids)
    check_ids(ids, layer.out_features, layer.name)
    out = layer.t_in.kron_right(head_rotated_rows(layer, ids)) * layer.in_scale_f32()[None, :]   # W'[ids] K_in
    return out.astype(np.float32).reshape(*ids.shape, layer.in_features)


def check_ids(ids: np.ndarray, rows: int, name: str) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"embedding {name}: token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise IndexError(f"embedding {name}: token id out of range [0, {rows})")


# --- torch modules ------------------------------------------------------------------------
try:
    import torch
    from torch import nn
except ImportError:  # numpy-only deployments
    torch = None

if torch is not None:
    class QuantEmbedding(nn.Module):
        """nn.Embedding's forward over a quantized table.

        source: an EmbeddingTable, or a QuantizedLinear head (shared codes, tied model).
        backend "reference": the whole table dequantized once (the head's effective weight,
        float32), then indexed: the readable definition. "kernels": only the rows of the
        ids are decoded, per call; a shared head's inverse input transform runs on the C++
        kernels (`kernels.kron_apply`).
        scale: what the model's own embedding module multiplies its rows by (Gemma 3's
        `embed_scale`), or None; `lookup` gives the rows before it."""

        def __init__(self, source, backend: str = "reference", scale: float | None = None):
            super().__init__()
            if backend not in ("reference", "kernels"):
                raise ValueError(f"unknown embedding backend {backend!r}; expected reference or kernels")
            self.source, self.backend = source, backend
            if isinstance(source, QuantizedLinear):
                check_shared_head(source)
                self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
                self.kind = f"head {source.bits}-bit"
            elif isinstance(source, EmbeddingTable):
                self.num_embeddings, self.embedding_dim = source.rows, source.dim
                self.kind = f"table {source.bits}-bit/{source.group}"
            else:
                raise TypeError(f"expected an EmbeddingTable or a QuantizedLinear, got {type(source).__name__}")
            table = None
            if backend == "reference":
                # (not effective_weight(): its identity output transform would be a dense
                # vocab x vocab matrix)
                full = (head_rows(source, np.arange(source.out_features))
                        if isinstance(source, QuantizedLinear) else source.dequantize())
                table = torch.from_numpy(np.ascontiguousarray(full, dtype=np.float32))
            elif isinstance(source, QuantizedLinear):
                from . import kernels

                kernels._require()
                self._in_scale = source.in_scale_f32()
            self.register_buffer("table", table, persistent=False)
            self.register_buffer("scale", None if scale is None else torch.tensor(float(scale)),
                                 persistent=False)

        def rows(self, ids: np.ndarray) -> np.ndarray:
            """float32 rows for integer ids (numpy), decoded on demand."""
            src = self.source
            if isinstance(src, EmbeddingTable):
                return src.gather(ids)
            from . import kernels

            check_ids(ids, src.out_features, src.name)
            rot = head_rotated_rows(src, ids)
            out = kernels.kron_apply(rot, src.t_in, transpose=True) * self._in_scale[None, :]
            return out.reshape(*ids.shape, src.in_features)

        def lookup(self, ids: torch.Tensor) -> torch.Tensor:
            """The stored rows of the ids (float32), before `scale`."""
            if self.table is not None:
                return torch.nn.functional.embedding(ids, self.table)
            device = ids.device
            out = torch.from_numpy(np.ascontiguousarray(self.rows(ids.detach().cpu().numpy())))
            return out.to(device)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            rows = self.lookup(ids)
            return rows if self.scale is None else rows * self.scale

        def extra_repr(self) -> str:
            scaled = "" if self.scale is None else f", scale={float(self.scale):g}"
            return (f"{self.num_embeddings}, {self.embedding_dim}, {self.kind}, backend={self.backend}{scaled}")
else:
    class QuantEmbedding:  # noqa: D101 - placeholder that explains itself
        def __init__(self, *args, **kwargs):
            raise RuntimeError("QuantEmbedding needs torch; use EmbeddingTable.gather / head_rows with numpy")
