"""Rounding a block's linears, spread over the ranks of a distributed compile.

Each linear is rounded by one rank (a fixed, cost-balanced assignment) and broadcast to the
others, so every rank can install the block's quantized weights. Rounding a linear needs
nothing from the others but the stats shared by the linears that read the same input
(its Hessian group, methods.LayerInput.cache); the group's leader (its first linear) names
them, so a rank holding only the group's later linears computes the same values.
"""
from __future__ import annotations

from torch import nn

from quipc_runtime.layer import QuantizedLinear

from ..config import QuantConfig
from ..distributed import SINGLE, Group
from ..memory import return_freed_memory
from .methods import LayerInput, quantize_linear

SETUP_COST = 4   # a Hessian group's own work on a rank (damping, eigh, rotation) ~ 4 n^3


def assign(shapes: list[tuple[int, int]], groups: list[int], world: int) -> list[int]:
    """Owner rank of each linear: longest first onto the least loaded rank, where a rank pays
    its Hessian group's setup once (m n^2 per linear, SETUP_COST n^3 per group per rank)."""
    load = [0.0] * world
    owned: list[set[int]] = [set() for _ in range(world)]
    owner = [0] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0] * shapes[i][1] ** 2, i))
    for i in order:
        m, n = shapes[i]

        def cost(r: int) -> float:
            return m * n * n + (0 if groups[i] in owned[r] else SETUP_COST * n ** 3)

        r = min(range(world), key=lambda r: (load[r] + cost(r), r))
        load[r] += cost(r)
        owned[r].add(groups[i])
        owner[i] = r
    return owner


def encode_block(block: nn.Module, names: list[str], hessians: dict, full_names: dict[str, str],
                 cfg: QuantConfig, group: Group = SINGLE, quantize=quantize_linear) -> list[QuantizedLinear]:
    """The block's linears (in `names` order) rounded; with several ranks each rounds its
    share and the results are broadcast. quantize: methods.quantize_linear or a stand-in.
    `hessians` is consumed: a group's entries are dropped once its linears are rounded."""
    modules = dict(block.named_modules())
    group_id: dict[int, int] = {}
    groups = [group_id.setdefault(id(hessians.get(n, n)), len(group_id)) for n in names]
    shapes = [tuple(modules[n].weight.shape) for n in names]
    owner = assign(shapes, groups, group.world) if group.world > 1 else [0] * len(names)
    last = {g: i for i, g in enumerate(groups) if owner[i] == group.rank}   # a group's last linear here
    caches: dict[int, dict] = {}
    mine = {}
    for i, (n, g) in enumerate(zip(names, groups)):
        if owner[i] != group.rank:
            continue
        h = hessians.get(n)
        lin = modules[n]
        # rounding runs on the CPU in float64/32 whatever the calibration device
        bias = lin.bias.data.cpu() if lin.bias is not None else None
        cache = caches.setdefault(g, {"leader": full_names[names[groups.index(g)]]})
        # `hessians` is consumed: the group's H is damped and rotated in its own memory (spend_hessian)
        mine[i] = quantize(LayerInput(full_names[n], lin.weight.data.cpu(), bias,
                                      None if h is None else h.cpu(), cache, last_reader=last[g] == i,
                                      spend_hessian=h is not None), cfg)
        if last[g] == i:   # free the group's Hessian and its rotated copies
            del cache, h
            caches.pop(g)
            for j in (j for j, gj in enumerate(groups) if gj == g):
                hessians.pop(names[j], None)
        return_freed_memory()
    # every rank rounds its share first, then the results go round (one broadcast each)
    return [group.broadcast_object(mine.get(i), src=owner[i]) for i in range(len(names))]
