"""The stored form of one QuIP-quantized linear layer and its exact meaning.

    y = s_out * K_out^T ( W' ( K_in (in_scale * x) ) ) + bias

W' is the quantized weight in the rotated domain, stored in a code format (see
quipc_runtime.formats: "grid" is W'[i, j] = scale[i] * code[i, j] + zero[i], "e8p" holds
E8-lattice vector codes), K_in / K_out the Kronecker parts of the input / output
transforms, in_scale folds the diagonal rescaling and the input signs (fp16), s_out the
output signs (stored as bits).

A layer may keep some output rows at 8 bits ("row patch": row_ids, row_values, row_scale):
y[..., row_ids[k]] = row_scale[k] * (row_values[k] @ x), replacing what the codes give for
those rows, in the original domain (no transform). quipc keeps the lm_head's most frequent
tokens this way (passes/head.py); the codes of those rows stay stored, and a tied embedding
keeps decoding them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .formats import DEFAULT_FORMAT, get_format
from .packing import check_bits
from .transforms import Transform


@dataclass
class QuantizedLinear:
    name: str
    out_features: int
    in_features: int
    bits: int
    codes: np.ndarray            # (m, packed_row_bytes) uint8, meaning set by the format
    scale: np.ndarray            # (m,) or (m, stages) float16
    zero: np.ndarray | None      # (m,) float16 for "grid", None for formats without offsets
    t_in: Transform
    t_out: Transform
    in_scale: np.ndarray | None = None   # (n,) float16, None means ones
    bias: np.ndarray | None = None       # (m,) float32
    info: dict = field(default_factory=dict)  # method, proxy losses, incoherence stats
    format: str = DEFAULT_FORMAT
    row_ids: np.ndarray | None = None      # (k,) int32, ascending, the rows kept at 8 bits
    row_values: np.ndarray | None = None   # (k, n) int8
    row_scale: np.ndarray | None = None    # (k,) float16

    @property
    def has_row_patch(self) -> bool:
        return self.row_ids is not None

    def validate(self) -> None:
        m, n = self.out_features, self.in_features
        check_bits(self.bits)
        fmt = get_format(self.format)
        try:
            fmt.check(self.bits, n, m)
        except ValueError as e:
            raise ValueError(f"layer {self.name}: {e}") from None
        expect = dict(fmt.tensor_specs(m, n, self.bits))
        if "zero" not in expect and self.zero is not None:
            raise ValueError(f"layer {self.name}: format {self.format!r} has no zero points")
        if self.in_scale is not None:
            expect["in_scale"] = ((n,), np.float16)
        if self.bias is not None:
            expect["bias"] = ((m,), np.float32)
        for key, (shape, dtype) in expect.items():
            arr = getattr(self, key)
            if arr is None:
                raise ValueError(f"layer {self.name}: {key} is missing for format {self.format!r}")
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"layer {self.name}: {key} has shape {arr.shape} {arr.dtype}, "
                                 f"expected {shape} {np.dtype(dtype)}")
        self._validate_row_patch()
        if self.t_in.n != n or self.t_out.n != m:
            raise ValueError(f"layer {self.name}: transform sizes do not match its shape {m}x{n}")
        for key in ("scale", "zero", "in_scale", "bias"):
            arr = getattr(self, key)
            if arr is not None and not np.isfinite(arr).all():
                raise ValueError(f"layer {self.name}: {key} holds NaN or Inf")

    def _validate_row_patch(self) -> None:
        parts = (self.row_ids, self.row_values, self.row_scale)
        if all(p is None for p in parts):
            return
        if any(p is None for p in parts):
            raise ValueError(f"layer {self.name}: a row patch needs row_ids, row_values and row_scale together")
        k, m, n = len(self.row_ids), self.out_features, self.in_features
        for key, arr, shape, dtype in (("row_ids", self.row_ids, (k,), np.int32),
                                       ("row_values", self.row_values, (k, n), np.int8),
                                       ("row_scale", self.row_scale, (k,), np.float16)):
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"layer {self.name}: {key} has shape {arr.shape} {arr.dtype}, "
                                 f"expected {shape} {np.dtype(dtype)}")
        if k == 0 or (k > 1 and not (np.diff(self.row_ids) > 0).all()) or self.row_ids[0] < 0 or self.row_ids[-1] >= m:
            raise ValueError(f"layer {self.name}: row_ids must be 1 or more distinct ascending rows in [0, {m})")
        if self.bias is not None:
            raise ValueError(f"layer {self.name}: a row patch on a layer with bias is not supported")

    def row_patch_f32(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_ids int64, (k, n) float32 rows): the patched rows' weights."""
        return (self.row_ids.astype(np.int64),
                self.row_values.astype(np.float32) * self.row_scale.astype(np.float32)[:, None])

    # --- numerics -------------------------------------------------------------------
    def rotated_weight(self) -> np.ndarray:
        """W' in float32: the dense quantized matrix that the kernels multiply by."""
        return get_format(self.format).decode(self.tensors(), self.bits, self.in_features)

    def in_scale_f32(self) -> np.ndarray:
        if self.in_scale is None:
            return np.ones(self.in_features, np.float32)
        return self.in_scale.astype(np.float32)

    def effective_weight(self, step: int = 256) -> np.ndarray:
        """The m x n matrix this layer computes, in the original domain (float64):
        s_out * K_out^T W' K_in * in_scale, the Kronecker parts applied factor by factor.
        W' is decoded `step` rows at a time into the result (no float32 W' beside it; the
        floats of Transform.kron_right on the whole W' for its default step)."""
        fmt, (m, n) = get_format(self.format), (self.out_features, self.in_features)
        tensors = {key: getattr(self, key) for key in fmt.tensor_specs(m, n, self.bits)}
        w = np.empty((m, n), np.float64)
        for r0 in range(0, m, step):                               # W' K_in
            rows = fmt.decode_rows(tensors, self.bits, n, np.arange(r0, min(r0 + step, m)))
            self.t_in.kron_right(rows, step=step, out=w[r0:r0 + step])
        self.t_out.kron_right(w.T, out=w.T)                      # K_out^T (W' K_in) = ((W' K_in)^T K_out)^T, in place
        w *= self.t_out.sign_vector()[:, None]
        w *= self.in_scale_f32()[None, :]
        if self.has_row_patch:
            ids, rows = self.row_patch_f32()
            w[ids] = rows
        return w

    # --- storage --------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        out = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        if self.in_scale is not None:
            out["in_scale"] = self.in_scale
        if self.t_out.signs is not None:
            out["out_signs"] = self.t_out.sign_bits()
        if self.bias is not None:
            out["bias"] = self.bias
        if self.has_row_patch:
            out.update(row_ids=self.row_ids, row_values=self.row_values, row_scale=self.row_scale)
        return out

    def meta(self) -> dict:
        return {"name": self.name, "shape": [self.out_features, self.in_features],
                "bits": self.bits, "format": self.format, "in_transform": self.t_in.meta(),
                "out_transform": self.t_out.meta(), **self.info}

    def storage_bits(self) -> int:
        """Bits stored for this layer per PROTOCOL's bpw (codes, scales, signs, seeds; the
        formats' codebooks are computed from constants, so they cost nothing per model)."""
        nbytes = sum(a.nbytes for k, a in self.tensors().items() if k != "bias")
        seeds = sum(8 for t in (self.t_in, self.t_out) if t.seed is not None)
        return 8 * (nbytes + seeds)

    def checksum(self) -> str:
        return tensors_checksum(self.tensors())

    @staticmethod
    def from_storage(meta: dict, tensors: dict[str, np.ndarray]) -> "QuantizedLinear":
        m, n = (int(v) for v in meta["shape"])
        fmt = meta.get("format", DEFAULT_FORMAT)
        if not isinstance(fmt, str):
            raise ValueError(f"layer {meta.get('name')}: format field {fmt!r} is not a format name")
        layer = QuantizedLinear(
            name=meta["name"], out_features=m, in_features=n, bits=int(meta["bits"]),
            codes=tensors["codes"], scale=tensors["scale"], zero=tensors.get("zero"), format=fmt,
            t_in=Transform.from_meta(meta["in_transform"]),
            t_out=Transform.from_meta(meta["out_transform"], tensors.get("out_signs")),
            in_scale=tensors.get("in_scale"), bias=tensors.get("bias"), row_ids=tensors.get("row_ids"),
            row_values=tensors.get("row_values"), row_scale=tensors.get("row_scale"),
            info={k: v for k, v in meta.items()
                  if k not in ("name", "shape", "bits", "format", "in_transform", "out_transform")})
        if layer.t_out.kind == "hadamard" and layer.t_out.signs is None:
            raise ValueError(f"layer {layer.name}: output sign bits are missing")
        layer.validate()
        return layer


def tensors_checksum(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
