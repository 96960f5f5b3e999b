"""Find a transformer's decoder blocks and the linear layers inside each, in the order
they run, by reading the module tree and watching one forward pass (no model-specific
attribute names)."""
from __future__ import annotations

import torch
from torch import nn


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks: the one with the most parameters among
    lists of identical-type modules (for Llama: model.layers)."""
    best, best_size = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(child) for child in mod}) != 1:
                continue
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None or not any(isinstance(m, nn.Linear) for m in best[1].modules()):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        what = f"{type(model).__name__}" + (f" (model_type {kind!r})" if kind else "")
        found = "" if best is None else (f"; its blocks ({best[0]}) hold no torch.nn.Linear, only "
                                         + ", ".join(sorted({type(m).__name__ for m in best[1][0].modules()
                                                             if not list(m.children())})))
        raise ValueError(f"could not find the decoder blocks (a ModuleList of blocks with "
                         f"torch.nn.Linear layers) in {what}{found}: quipc quantizes nn.Linear layers")
    return best


def linears_in_order(block: nn.Module, run_block) -> list[str]:
    """Names (relative to the block) of its nn.Linear modules in execution order;
    run_block() runs the block once."""
    order: list[str] = []
    hooks = []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            def record(_m, _inp, _name=name):
                if _name not in order:
                    order.append(_name)
            hooks.append(mod.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            run_block()
    finally:
        for h in hooks:
            h.remove()
    return order
