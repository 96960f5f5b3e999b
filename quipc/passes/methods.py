"""Quantization methods, one function each, found by name in a small registry.

Each method maps (weight, bias, calibration Hessian, config) to a QuantizedLinear in
the stored format; adding a method is adding one registered function.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.transforms import Transform, derive_seed

from ..config import QuantConfig
from ..memory import return_freed_memory
from .encoders import Encoded, encode, resolve_format
from .grid import fit_grid, minmax_grid
from .hessian import regularize
from .incoherence import (mu_hessian, mu_of_eigenvectors, mu_rotated_eigenvectors, mu_weight, rescale_vector,
                          rotate_hessian, rotate_weight, unrotate_weight)
from .ldlq import error_loss, proxy_loss


@dataclass
class LayerInput:
    name: str
    weight: torch.Tensor              # (out, in)
    bias: torch.Tensor | None = None
    hessian: torch.Tensor | None = None  # E[x x^T] of the layer's input, undamped
    cache: dict = field(default_factory=dict)  # stats shared by layers with the same input
    last_reader: bool = False  # no later linear uses `cache`: its matrices are freed once this one is rounded
    # the caller is done with `hessian` (passes/spread.encode_block's are consumed): method quip damps and
    # rotates it in its own memory, and takes the proxy losses from the rotated, damped H (_spent_rtn_loss)
    spend_hessian: bool = False
    # where a large spent H waits on disk while its positive definiteness is tested in its own memory
    # (hessian.regularize); None: tested in a copy
    scratch_dir: str | Path | None = None


# The diagnostics mu_h / mu_h_after need every eigenvector of the n x n Hessian (torch.linalg.eigh:
# minutes at n = 11008 on two cores, and 4 n x n float64 matrices); above this width they are
# not computed, and the layer's info says so (mu_h_skipped).
MU_EIGH_MAX_N = 8192

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
    m, n = inp.weight.shape
    cfg = replace(cfg, format=resolve_format(cfg.format, cfg.bits, n, m))  # "auto": this layer's format
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
    ref = max(error_loss(w, h), 1e-30)   # proxy_loss(0, W, H): W - 0 == W, sign of zeros included
    rtn = fit_grid(w, bits, "minmax")
    return {"proxy_loss_rtn": proxy_loss(w, rtn.round(w), h) / ref,
            "proxy_loss": proxy_loss(w, w + err, h) / ref}


def _mu_h_before(inp: LayerInput, h: torch.Tensor) -> dict:
    if "mu_h" not in inp.cache:
        n = h.shape[0]
        inp.cache["mu_h"] = mu_hessian(h) if n <= MU_EIGH_MAX_N else None
        if n > MU_EIGH_MAX_N:
            inp.cache["mu_h_skipped"] = (f"mu_h not computed: the eigendecomposition of the {n} x {n} Hessian "
                                         f"(n > MU_EIGH_MAX_N = {MU_EIGH_MAX_N}) costs minutes and 4 n x n "
                                         "float64 matrices")
    return {"mu_h": inp.cache["mu_h"],
            **({"mu_h_skipped": inp.cache["mu_h_skipped"]} if "mu_h_skipped" in inp.cache else {})}


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
            **_mu_h_before(inp, h),
            **_relative_losses(w, enc.values.double() - w, inp.hessian, cfg.bits)}
    return _store(inp, cfg, enc, Transform("identity", n), Transform("identity", m), None, info)


@register("quip")
def quantize_quip(inp: LayerInput, cfg: QuantConfig) -> QuantizedLinear:
    """Incoherence processing (optional rescale, random orthogonal U and V) + LDLQ.

    Layers that read the same input (q/k/v, gate/up) share the input transform V, so
    without rescaling they share H' = V H V^T too (and a runtime can transform their
    input once).

    Memory, in n x n float64 matrices (n the input width, the caller's H not counted): the
    group keeps H' only (H too with rescale, each layer needing its own H'), until its last
    reader is encoded; damping needs 2 (H and its Cholesky check), the diagnostic
    eigendecomposition 4 (n <= MU_EIGH_MAX_N only, before H' exists), rotating 1 (in place),
    encoding 1 (the BlockLDLQ factor), 0 for the group's last reader (the factor overwrites
    H'). With spend_hessian the caller's H is that memory: damped and rotated in place (and,
    with scratch_dir, tested there). In (m, n) float64 matrices: W is read in row chunks (any
    float dtype, no float64 copy of it); RTN's error 1 (spent path, freed before W' exists);
    W' 1, handed to the encoder as float32 (0.5: encoders round in float32), whose output
    adds 0.5 and then holds the error matrices.
    benchmarks/quip_memory.py measures it."""
    m, n = inp.weight.shape
    group = inp.cache
    if "t_in" not in group:
        if inp.spend_hessian:
            diag0 = torch.diagonal(inp.hessian).to(torch.float64, copy=True)
        group["h"], group["hinfo"] = regularize(inp.hessian, cfg.damp, inp.name, in_place=inp.spend_hessian,
                                                scratch_dir=inp.scratch_dir)
        if inp.spend_hessian:   # H_d - H: on the diagonal only (dead inputs' rows are zero in both)
            group["h_excess"] = None if "fallback" in group["hinfo"] else torch.diagonal(group["h"]) - diag0
            del diag0
        # seeded by the group's first linear, whichever linear (or rank, passes/spread.py) gets here first
        leader = group.get("leader", inp.name)
        group["t_in"] = Transform.make(cfg.incoherence, n, derive_seed(cfg.seed, leader, "in"))
    t_in = group["t_in"]
    t_out = Transform.make(cfg.incoherence, m, derive_seed(cfg.seed, inp.name, "out"))
    weight = inp.weight.detach()   # any float dtype, read in float64 a row chunk at a time: no float64 copy
    h = group.get("h")    # None once H' is built and no rescaling needs H again
    d = rescale_vector(weight, h) if cfg.rescale else torch.ones(n, dtype=torch.float64)
    # The stored in_scale = signs / d is fp16: rescale by exactly the stored value.
    in_scale = (torch.from_numpy(t_in.sign_vector()).double() / d).to(torch.float16)
    d = torch.from_numpy(t_in.sign_vector()).double() / in_scale.double()
    unit = bool((d == 1).all())   # x * 1 == x / 1 == x: no scaled copies
    mu_w = mu_weight(weight)
    if cfg.rescale or "h_rot" not in group:
        group.pop("h_rot", None)    # the previous layer's (rescale), freed before this one is built
        # H_r = H / d_i / d_j; without rescaling d == 1 and x / 1 == x: H itself, no copy
        h_r = h if unit else _rescaled(h, d)
        _mu_diagnostics(group, h, h_r, t_in, cfg.rescale)
        # in place unless H_r is the H that later layers (rescale) still read
        group["h_rot"] = rotate_hessian(h_r, t_in, in_place=h_r is not h or not cfg.rescale)
        del h_r
        if not cfg.rescale:
            del group["h"]           # the group's later layers read H' only (rotated in its memory)
        h = None
    h_rot = group["h_rot"]
    spent = "h_excess" in group
    # RTN's loss before W' exists (its error rotated in its own memory and freed)
    losses = _spent_rtn_loss(weight, cfg, group["h_excess"], h_rot, d, t_in, t_out) if spent else {}
    return_freed_memory()   # its row-chunk temporaries, before W' and its rotation's
    w_rot = rotate_weight(weight, t_in, t_out, col_scale=None if unit else d, dtype=torch.float64)
    mu_w_after = mu_weight(w_rot)
    if spent:    # tr(W H W^T) = tr(W' H' W'^T) less the damping
        losses["ref"] = max(_minus_excess(error_loss(w_rot, h_rot), weight, group["h_excess"]), 1e-30)
        losses["proxy_loss_rtn"] /= losses["ref"]
    w_rot = w_rot.to(torch.float32)    # what every encoder rounds (its float64 freed here)
    # H' read by no later linear (the group's last, or its own with rescale): the encoder may factor it in place
    consume = inp.last_reader or cfg.rescale
    enc = encode(cfg.format, w_rot, h_rot, cfg, consume=consume)
    if consume:
        group.pop("h_rot")
        if enc.proxy_loss is not None:
            h_rot = None     # overwritten by the factor: its memory goes now, before the error matrices
    if inp.last_reader:
        group.pop("h", None)
    # E' = W^' - W' in the decoded values' own float32 memory (for the diagnostic losses only)
    e_rot = enc.values.sub_(w_rot)
    enc.values = None     # read no more (the stored tensors are enc's codes and scales)
    del w_rot
    if spent:   # the encoder's own tr(E' H' E'^T) where it overwrote H', else from H'
        loss = enc.proxy_loss if enc.proxy_loss is not None else error_loss(e_rot, h_rot)
    del h_rot
    err = unrotate_weight(e_rot, t_in, t_out, out=e_rot)    # E' read no more: E in its memory
    del e_rot
    if not unit:
        err.div_(d.to(err.dtype)[None, :])
    if spent:
        losses["proxy_loss"] = _minus_excess(loss, err, group["h_excess"]) / losses.pop("ref")
    else:
        losses = _relative_losses(inp.weight.detach().to(torch.float64), err, inp.hessian, cfg.bits)
    info = {"method": "quip", "incoherence": t_in.kind if t_in.kind == t_out.kind
            else f"{t_in.kind}/{t_out.kind}", "hessian": group["hinfo"],
            "mu_w": mu_w, "mu_w_after": mu_w_after,
            "mu_h": group["mu_h"], "mu_h_after": group["mu_h_after"],
            **({"mu_h_skipped": group["mu_h_skipped"]} if "mu_h_skipped" in group else {}),
            **losses}
    if inp.last_reader:
        group.pop("h_excess", None)
    stored_in = Transform(t_in.kind, n, t_in.orders, t_in.seed)  # signs live in in_scale
    return _store(inp, cfg, enc, stored_in, t_out, in_scale.numpy(), info)


def _minus_excess(loss: float, e: torch.Tensor, excess: torch.Tensor | None) -> float:
    """tr(E H E^T) from tr(E H_d E^T) for H_d = H + diag(excess) (None: regularize fell back
    to another matrix, whose loss is reported as it is)."""
    return loss - _excess_term(e, excess)


def _excess_term(e: torch.Tensor, excess: torch.Tensor | None) -> float:
    """tr(E diag(excess) E^T) (0 without excess)."""
    return 0.0 if excess is None else float((_column_squares(e) * excess).sum())


def _column_squares(e: torch.Tensor, step: int = 256) -> torch.Tensor:
    """||E_:i||^2 for every column i (float64), `step` rows at a time."""
    out = torch.zeros(e.shape[1], dtype=torch.float64)
    for r0 in range(0, e.shape[0], step):
        out += e[r0:r0 + step].to(torch.float64).pow(2).sum(0)
    return out


def _spent_rtn_loss(weight: torch.Tensor, cfg: QuantConfig, excess, h_rot: torch.Tensor, d: torch.Tensor,
                    t_in: Transform, t_out: Transform) -> dict:
    """_relative_losses' RTN loss when the caller's H was spent, not yet divided by the
    reference tr(W H W^T) (the caller's `ref`): tr(E H_d E^T) = tr(E' H' E'^T) for
    E' = U E D V^T (the rotation of the weight), less the damping (_minus_excess). Computed
    before encoding (which may overwrite H'); W read in row chunks (minmax_grid, round_error)."""
    rtn_err = minmax_grid(weight, cfg.bits).round_error(weight, dtype=torch.float64)
    damping = _excess_term(rtn_err, excess)    # before rtn_err's memory holds its rotation
    rtn_rot = rotate_weight(rtn_err.mul_(d[None, :]), t_in, t_out, out=rtn_err)   # in its own memory
    out = {"proxy_loss_rtn": error_loss(rtn_rot, h_rot) - damping}
    if excess is None:
        out["proxy_loss_hessian"] = "the fallback Hessian of regularize (see hessian)"
    return out


def _rescaled(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """h / d[:, None] / d[None, :] with one new matrix."""
    h_r = h / d[:, None]
    return h_r.div_(d[None, :])


def _mu_diagnostics(group: dict, h: torch.Tensor, h_r: torch.Tensor, t_in: Transform, rescale: bool) -> None:
    """The group's mu_h (incoherence of H) and mu_h_after (of V H_r V^T), from eigh(H_r) (and
    eigh(H) with rescale). Above MU_EIGH_MAX_N both are None and `mu_h_skipped` says why."""
    n = h_r.shape[0]
    if n > MU_EIGH_MAX_N:
        group["mu_h"] = group["mu_h_after"] = None
        group["mu_h_skipped"] = (f"mu_h / mu_h_after not computed: the eigendecomposition of the {n} x {n} "
                                 f"Hessian (n > MU_EIGH_MAX_N = {MU_EIGH_MAX_N}) costs minutes and 4 n x n "
                                 "float64 matrices")
        return
    # eigenvectors of V H_r V^T are V times those of H_r: one eigh gives both mu's
    _, q = torch.linalg.eigh(h_r)
    group["mu_h_after"] = mu_rotated_eigenvectors(q, t_in)
    if "mu_h" not in group and not rescale:
        group["mu_h"] = mu_of_eigenvectors(q)
    del q
    if "mu_h" not in group:
        group["mu_h"] = mu_hessian(h)
