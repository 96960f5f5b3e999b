"""Quantization methods, one function each, found by name in a small registry.

Each method maps (weight, bias, calibration Hessian, config) to a QuantizedLinear in
the stored format; adding a method is adding one registered function.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.transforms import Transform, derive_seed

from ..config import QuantConfig
from .encoders import Encoded, encode
from .grid import fit_grid
from .hessian import regularize
from .incoherence import (apply_rows, mu_hessian, mu_of_eigenvectors, mu_weight, rescale_vector,
                          rotate_hessian, rotate_weight, unrotate_weight)
from .ldlq import proxy_loss


@dataclass
class LayerInput:
    name: str
    weight: torch.Tensor              # (out, in)
    bias: torch.Tensor | None = None
    hessian: torch.Tensor | None = None  # E[x x^T] of the layer's input, undamped
    cache: dict = field(default_factory=dict)  # stats shared by layers with the same input


METHODS: dict[str, Callable[[LayerInput, QuantConfig], QuantizedLinear]] = {}


def register(name: str):
    def wrap(fn):
        METHODS[name] = fn
        return fn
    return wrap


def quantize_linear(inp: LayerInput, cfg: QuantConfig) -> QuantizedLinear:
    if not torch.isfinite(inp.weight).all():
        raise ValueError(f"{inp.name}: the weight holds NaN or Inf; refusing to quantize it")
    if METHODS.get(cfg.method) is None:
        raise ValueError(f"unknown method {cfg.method!r}")
    if cfg.method != "rtn" and inp.hessian is None:
        raise ValueError(f"{inp.name}: method {cfg.method} needs a calibration Hessian")
    return METHODS[cfg.method](inp, cfg)


# --- shared pieces ------------------------------------------------------------------------
def _store(inp: LayerInput, cfg: QuantConfig, enc: Encoded, t_in: Transform, t_out: Transform,
           in_scale: np.ndarray | None, info: dict) -> QuantizedLinear:
    m, n = inp.weight.shape
    bias = None if inp.bias is None else inp.bias.detach().float().cpu().numpy()
    layer = QuantizedLinear(
        name=inp.name, out_features=m, in_features=n, bits=cfg.bits, codes=enc.codes, scale=enc.scale,
        zero=enc.zero, format=cfg.format, t_in=t_in, t_out=t_out, in_scale=in_scale, bias=bias, info=info)
    layer.validate()
    return layer


def _relative_losses(w: torch.Tensor, err: torch.Tensor, h: torch.Tensor | None, bits: int) -> dict:
    """Proxy loss tr(E H E^T) / tr(W H W^T) of the chosen rounding and of plain RTN."""
    if h is None:
        return {}
    h = h.to(torch.float64)
    ref = max(proxy_loss(torch.zeros_like(w), w, h), 1e-30)
    rtn = fit_grid(w, bits, "minmax")
    return {"proxy_loss_rtn": proxy_loss(w, rtn.round(w), h) / ref,
            "proxy_loss": proxy_loss(w, w + err, h) / ref}


def _mu_h_before(inp: LayerInput, h: torch.Tensor) -> float:
    if "mu_h" not in inp.cache:
        inp.cache["mu_h"] = mu_hessian(h)
    return inp.cache["mu_h"]


# --- methods ------------------------------------------------------------------------------
@register("rtn")
def quantize_rtn(inp: LayerInput, cfg: QuantConfig) -> QuantizedLinear:
    """Nearest rounding, no calibration (the baseline; the grid format uses min-max rows)."""
    w = inp.weight.detach().to(torch.float64)
    m, n = w.shape
    enc = encode(cfg.format, w, None, replace(cfg, grid="minmax"))
    info = {"method": "rtn", "mu_w": mu_weight(w),
            **_relative_losses(w, enc.values.double() - w, inp.hessian, cfg.bits)}
    return _store(inp, cfg, enc, Transform("identity", n), Transform("identity", m), None, info)


@register("ldlq")
def quantize_ldlq(inp: LayerInput, cfg: QuantConfig) -> QuantizedLinear:
    """LDLQ (= OPTQ) on the original coordinates."""
    w = inp.weight.detach().to(torch.float64)
    m, n = w.shape
    h, hinfo = regularize(inp.hessian, cfg.damp, inp.name)
    enc = encode(cfg.format, w, h, cfg)
    info = {"method": "ldlq", "hessian": hinfo, "mu_w": mu_weight(w),
            "mu_h": _mu_h_before(inp, h),
            **_relative_losses(w, enc.values.double() - w, inp.hessian, cfg.bits)}
    return _store(inp, cfg, enc, Transform("identity", n), Transform("identity", m), None, info)


@register("quip")
def quantize_quip(inp: LayerInput, cfg: QuantConfig) -> QuantizedLinear:
    """Incoherence processing (optional rescale, random orthogonal U and V) + LDLQ.

    Layers that read the same input (q/k/v, gate/up) share the input transform V, so
    without rescaling they share H' = V H V^T too (and a runtime can transform their
    input once)."""
    w = inp.weight.detach().to(torch.float64)
    m, n = w.shape
    group = inp.cache
    if "h" not in group:
        group["h"], group["hinfo"] = regularize(inp.hessian, cfg.damp, inp.name)
        # seeded by the group's first linear, whichever linear (or rank, passes/spread.py) gets here first
        leader = group.get("leader", inp.name)
        group["t_in"] = Transform.make(cfg.incoherence, n, derive_seed(cfg.seed, leader, "in"))
    h, t_in = group["h"], group["t_in"]
    t_out = Transform.make(cfg.incoherence, m, derive_seed(cfg.seed, inp.name, "out"))
    d = rescale_vector(w, h) if cfg.rescale else torch.ones(n, dtype=torch.float64)
    # The stored in_scale = signs / d is fp16: rescale by exactly the stored value.
    in_scale = (torch.from_numpy(t_in.sign_vector()).double() / d).to(torch.float16)
    d = torch.from_numpy(t_in.sign_vector()).double() / in_scale.double()
    w_rot = rotate_weight(w * d[None, :], t_in, t_out)
    if cfg.rescale or "h_rot" not in group:
        h_r = h / d[:, None] / d[None, :]
        group["h_rot"] = rotate_hessian(h_r, t_in)
        # eigenvectors of V H_r V^T are V times those of H_r: one eigh gives both mu's
        _, q = torch.linalg.eigh(h_r)
        group["mu_h_after"] = mu_of_eigenvectors(apply_rows(q.t(), t_in).t())
        if "mu_h" not in group:
            group["mu_h"] = mu_of_eigenvectors(q) if not cfg.rescale else mu_hessian(h)
    h_rot = group["h_rot"]
    enc = encode(cfg.format, w_rot, h_rot, cfg)
    err = unrotate_weight(enc.values.double() - w_rot, t_in, t_out) / d[None, :]
    info = {"method": "quip", "incoherence": t_in.kind if t_in.kind == t_out.kind
            else f"{t_in.kind}/{t_out.kind}", "hessian": group["hinfo"],
            "mu_w": mu_weight(w), "mu_w_after": mu_weight(w_rot),
            "mu_h": group["mu_h"], "mu_h_after": group["mu_h_after"],
            **_relative_losses(w, err, inp.hessian, cfg.bits)}
    stored_in = Transform(t_in.kind, n, t_in.orders, t_in.seed)  # signs live in in_scale
    return _store(inp, cfg, enc, stored_in, t_out, in_scale.numpy(), info)
