"""Pure-torch reference modules: the semantics every fast kernel must reproduce."""
from __future__ import annotations

import torch
from torch import nn

from .layer import QuantizedLinear


def kron_apply(x: torch.Tensor, mats: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """(F_1 x ... x F_k) x along the last dim (or its transpose), one small matmul per factor."""
    if not mats:
        return x
    shape = x.shape
    orders = [int(m.shape[0]) for m in mats]
    y = x.reshape(-1, *orders)
    for axis, mat in enumerate(mats, start=1):
        mat = mat.t() if transpose else mat
        y = torch.movedim(torch.tensordot(y, mat, dims=([axis], [1])), -1, axis)
    return y.reshape(shape)


def apply_row_patch(y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor | None,
                    rows: torch.Tensor | None) -> torch.Tensor:
    """y with its columns `ids` (the layer's patched output rows) recomputed as x @ rows^T."""
    if ids is None:
        return y
    return y.index_copy(-1, ids, torch.nn.functional.linear(x.to(rows.dtype), rows).to(y.dtype))


class QuipLinearRef(nn.Module):
    """y = s_out * K_out^T (W' (K_in (in_scale * x))) + b with W' dequantized once, densely."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits = layer.bits
        self.register_buffer("weight_rot", torch.from_numpy(layer.rotated_weight()), persistent=False)
        self.register_buffer("in_scale", torch.from_numpy(layer.in_scale_f32()), persistent=False)
        self.register_buffer("out_signs", torch.from_numpy(layer.t_out.sign_vector()), persistent=False)
        self.n_in = len(layer.t_in.matrices())
        for i, mat in enumerate(layer.t_in.matrices() + layer.t_out.matrices()):
            self.register_buffer(f"factor{i}", torch.from_numpy(mat.copy()), persistent=False)
        bias = None if layer.bias is None else torch.from_numpy(layer.bias)
        self.register_buffer("bias", bias, persistent=False)
        ids, rows = layer.row_patch_f32() if layer.has_row_patch else (None, None)
        self.register_buffer("row_ids", None if ids is None else torch.from_numpy(ids), persistent=False)
        self.register_buffer("row_weight", None if rows is None else torch.from_numpy(rows), persistent=False)

    def _factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mats = [b for name, b in self.named_buffers() if name.startswith("factor")]
        return mats[: self.n_in], mats[self.n_in:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_with(x, self.in_scale)

    def apply_with(self, x: torch.Tensor, in_scale: torch.Tensor,
                   row_gain: torch.Tensor | None = None) -> torch.Tensor:
        """The layer with `in_scale` (and an optional gain on each row of W') given by the
        caller: fine-tuning trains these while the codes stay fixed."""
        f_in, f_out = self._factors()
        dtype = x.dtype
        z = kron_apply(x.to(self.weight_rot.dtype) * in_scale, f_in)
        t = torch.nn.functional.linear(z, self.weight_rot)
        if row_gain is not None:
            t = t * row_gain
        y = kron_apply(t, f_out, transpose=True) * self.out_signs
        y = apply_row_patch(y, x, self.row_ids, self.row_weight)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def dense_weight_with(self, in_scale: torch.Tensor, row_gain: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) float32 matrix apply_with multiplies by, bias aside:
        diag(out_signs) K_out^T diag(row_gain) W' K_in diag(in_scale), the patched rows exact.
        Differentiable in in_scale and row_gain; costs one pass of the factors over W' instead
        of two over the activations, so it is the cheaper way for many rows of x at once."""
        f_in, f_out = self._factors()
        w = kron_apply(self.weight_rot, f_in, transpose=True)
        if row_gain is not None:
            w = w * row_gain.unsqueeze(-1)
        w = kron_apply(w.t(), f_out, transpose=True).t() * self.out_signs.unsqueeze(-1) * in_scale
        if self.row_ids is not None:
            w = w.index_copy(0, self.row_ids, self.row_weight)
        return w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
