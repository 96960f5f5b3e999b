"""Rounding a block's linears, spread over the ranks of a distributed compile.

Each linear is rounded by one rank (a fixed, cost-balanced assignment) and broadcast to the
others, so every rank can install the block's quantized weights. Rounding a linear needs
nothing from the others but the stats shared by the linears that read the same input
(its Hessian group, methods.LayerInput.cache); the group's leader (its first linear) names
them, so a rank holding only the group's later linears computes the same values.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quipc_runtime.layer import QuantizedLinear

from ..config import QuantConfig
from ..distributed import SINGLE, Group
from ..memory import return_freed_memory
from .encoders import ROW_SEPARABLE, Encoded, encode
from .methods import LayerInput, quantize_linear

# The cost of rounding a linear of m rows x n columns ~ m n (n + SEARCH_COST): the feedback (m n^2)
# and the code search (e8p: ~ m n); plus SETUP_COST n^3 for its Hessian group's own work on a rank
# (damping, eigenvectors, LDL). Fitted to e8p's seconds on SmolLM2's shapes (1 thread: q 0.44,
# k 0.14, o 0.35, gate 1.03, up 0.86, down 1.98 s), which the former m n^2 + 4 n^3 split as
# down alone against the other six (1.98 / 2.93 s); this one as down + o / the rest (2.33 / 2.58 s).
SEARCH_COST = 2800
SETUP_COST = 0.7
# With a spill folder, a Hessian this large waits on disk until its group's turn (all but the
# first group's): one large n x n matrix resident at a time (a 7B down_proj's is 969 MB).
SPILL_BYTES = 256 * 2**20


def assign(shapes: list[tuple[int, int]], groups: list[int], world: int) -> list[int]:
    """Owner rank of each linear: longest first onto the least loaded rank, where a rank pays
    its Hessian group's setup once (m n (n + SEARCH_COST) per linear, SETUP_COST n^3 per group
    per rank)."""
    load = [0.0] * world
    owned: list[set[int]] = [set() for _ in range(world)]
    owner = [0] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0] * shapes[i][1] * (shapes[i][1] + SEARCH_COST), i))
    for i in order:
        m, n = shapes[i]

        def cost(r: int) -> float:
            return m * n * (n + SEARCH_COST) + (0 if groups[i] in owned[r] else SETUP_COST * n ** 3)

        r = min(range(world), key=lambda r: (load[r] + cost(r), r))
        load[r] += cost(r)
        owned[r].add(groups[i])
        owner[i] = r
    return owner


ROW_STEP = 128   # a rank's share of encode_rows' rows: a multiple of this


def encode_rows(fmt: str, w: torch.Tensor, h: torch.Tensor | None, cfg: QuantConfig,
                group: Group = SINGLE) -> Encoded:
    """encode(fmt, w, h, cfg) on every rank, the rows shared among the ranks (a contiguous run
    each) when the format's encoder is row-separable (encoders.ROW_SEPARABLE): the floats of one
    call, at 1/world of its time (a large lm_head)."""
    if group.world == 1 or fmt not in ROW_SEPARABLE:
        return encode(fmt, w, h, cfg)
    m = w.shape[0]
    cuts = [min(m, round(m * r / group.world / ROW_STEP) * ROW_STEP) for r in range(group.world)] + [m]
    r0, r1 = cuts[group.rank], cuts[group.rank + 1]
    parts = [p for p in group.all_gather_object(encode(fmt, w[r0:r1], h, cfg) if r1 > r0 else None)
             if p is not None]

    def stacked(field):
        return None if getattr(parts[0], field) is None else np.concatenate([getattr(p, field) for p in parts])

    return Encoded(codes=stacked("codes"), scale=stacked("scale"), zero=stacked("zero"),
                   values=torch.cat([p.values for p in parts]))


def encode_block(block: nn.Module, names: list[str], hessians: dict, full_names: dict[str, str],
                 cfg: QuantConfig, group: Group = SINGLE, quantize=quantize_linear,
                 spill_dir: str | Path | None = None,
                 weight_done: Callable[[str], None] | None = None) -> list[QuantizedLinear]:
    """The block's linears (in `names` order) rounded; with several ranks each rounds its
    share and the results are broadcast. quantize: methods.quantize_linear or a stand-in.
    `hessians` is consumed: a group's entries are dropped once its linears are rounded.
    spill_dir: large Hessians wait there until their group's turn (SPILL_BYTES).
    weight_done(name): told when this rank reads a linear's weight no more (rounded here, or
    rounded by another rank), so that the caller may free it (sequential.quantize_model)."""
    modules = dict(block.named_modules())
    group_id: dict[int, int] = {}
    groups = [group_id.setdefault(id(hessians.get(n, n)), len(group_id)) for n in names]
    shapes = [tuple(modules[n].weight.shape) for n in names]
    owner = assign(shapes, groups, group.world) if group.world > 1 else [0] * len(names)
    last = {g: i for i, g in enumerate(groups) if owner[i] == group.rank}   # a group's last linear here
    for n, g in zip(names, groups):
        if g not in last:          # rounded by other ranks: this rank's copy is not needed
            hessians.pop(n, None)
    weight_done = weight_done or (lambda name: None)
    for i, n in enumerate(names):
        if owner[i] != group.rank:
            weight_done(n)
    spilled = _spill(hessians, names, groups, last, spill_dir) if spill_dir is not None else {}
    try:
        mine = _encode_mine(names, groups, owner, last, modules, hessians, spilled, full_names, cfg, group, quantize,
                            spill_dir, weight_done)
    finally:
        for path in spilled.values():
            path.unlink(missing_ok=True)
    # every rank rounds its share first, then the results go round (one broadcast each)
    return [group.broadcast_object(mine.get(i), src=owner[i]) for i in range(len(names))]


def _spill(hessians: dict, names: list[str], groups: list[int], last: dict[int, int],
           spill_dir: str | Path) -> dict[int, Path]:
    """Every large Hessian of this rank's groups but the first one's, written to spill_dir
    and dropped from `hessians`: {group: file}."""
    spilled: dict[int, Path] = {}
    order = sorted(last, key=lambda g: groups.index(g))
    for g in order[1:]:
        h = hessians.get(names[groups.index(g)])
        if h is None or h.numel() * h.element_size() < SPILL_BYTES:
            continue
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="hessian-", suffix=".pt", dir=spill_dir)
        os.close(fd)
        spilled[g] = Path(path)
        torch.save(h, spilled[g])
        for n, gn in zip(names, groups):
            if gn == g:
                hessians.pop(n, None)
        del h
    return spilled


def _encode_mine(names, groups, owner, last, modules, hessians, spilled, full_names, cfg, group, quantize,
                 scratch_dir, weight_done) -> dict:
    """This rank's linears rounded, in order: {index: QuantizedLinear}. scratch_dir: where a large
    Hessian waits while its damping is tested in its own memory (methods.LayerInput)."""
    caches: dict[int, dict] = {}
    mine = {}
    final = {g: i for i, g in enumerate(groups)}   # a group's last linear over all ranks
    for i, (n, g) in enumerate(zip(names, groups)):
        if owner[i] != group.rank:
            continue
        if g in spilled:    # the group's turn: its Hessian back from disk
            path = spilled.pop(g)
            loaded = torch.load(path, weights_only=True)
            path.unlink()
            for nj, gj in zip(names, groups):
                if gj == g:
                    hessians[nj] = loaded
            del loaded
        h = hessians.get(n)
        lin = modules[n]
        # rounding runs on the CPU in float64/32 whatever the calibration device
        bias = lin.bias.data.cpu() if lin.bias is not None else None
        cache = caches.setdefault(g, {"leader": full_names[names[groups.index(g)]]})
        # `hessians` is consumed: the group's H is damped and rotated in its own memory (spend_hessian);
        # H' is factored in place for the group's last linear only, as in one process (the proxy loss
        # recorded is computed the same way whichever rank rounds it); a rank's own last frees the rest
        mine[i] = quantize(LayerInput(full_names[n], lin.weight.data.cpu(), bias,
                                      None if h is None else h.cpu(), cache, last_reader=final[g] == i,
                                      spend_hessian=h is not None,
                                      scratch_dir=scratch_dir), cfg)
        del lin, bias
        weight_done(n)
        if last[g] == i:   # free the group's Hessian and its rotated copies
            del cache, h
            caches.pop(g)
            for j in (j for j, gj in enumerate(groups) if gj == g):
                hessians.pop(names[j], None)
        return_freed_memory()
    return mine
