"""Linears that read the very same tensor (q/k/v from one norm, gate/up from another), and the
tying of their input scales while they are fine-tuned.

Siblings are what a backend can run as one group (ai.quipc QuipLinearGroup: the input scale
and transform applied once, one product over their stacked rows) when their input side is equal:
same transform, same signs, same in_scale. Rounding gives siblings that input side (the Hessian
group's transform, passes/methods.py); fine-tuning each sibling's in_scale apart breaks it.
Tying keeps one in_scale per sibling set, trained on all of the set's gradients.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def tensor_key(x: torch.Tensor) -> tuple:
    """What makes two inputs the very same tensor within one forward (while both are alive)."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype


def input_siblings(model: nn.Module, names: list[str], run: Callable[[], object]) -> list[list[str]]:
    """`names` grouped by the tensor each reads during `run()` (one forward of `model`), the
    groups in the order their inputs are first seen, each in `names` order. A name whose module
    `run()` never calls is its own group, after the others."""
    modules = dict(model.named_modules())
    seen: dict[tuple, tuple[int, torch.Tensor]] = {}
    group_of: dict[str, int] = {}

    def hook(name: str):
        def fn(_mod, inp):
            x = inp[0]
            key = tensor_key(x)
            if key not in seen:
                # x is held so that its memory is not reused by a later input of this forward,
                # which would make a different tensor look like the same one
                seen[key] = (len(seen), x)
            group_of.setdefault(name, seen[key][0])
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(group_of.get(n, len(seen) + names.index(n)), []).append(n)
    return [groups[g] for g in sorted(groups)]


def tie_input_scales(tunables: dict[str, nn.Module], groups: list[list[str]]) -> list[list[str]]:
    """Within each group, make every tunable linear's `in_scale` the first one's Parameter, where
    their values are equal (a set whose scales already differ, e.g. rounded with --rescale, is left
    untied: tying would change the model). Returns the sets tied (two or more members)."""
    tied = []
    for names in groups:
        names = [n for n in names if n in tunables]
        if len(names) < 2:
            continue
        first = tunables[names[0]].in_scale
        if not all(torch.equal(tunables[n].in_scale.detach(), first.detach()) for n in names[1:]):
            continue
        for n in names[1:]:
            tunables[n].in_scale = first
        tied.append(names)
    return tied


def unique_parameters(params) -> list[nn.Parameter]:
    """`params` with each Parameter once (tied ones appear in every sibling), in first-seen order."""
    out, ids = [], set()
    for p in params:
        if id(p) not in ids:
            ids.add(id(p))
            out.append(p)
    return out
