"""Fine-tuning within a decoder block, while it is being rounded (QuIP#'s first stage).

The block's linears are rounded in rounds, one per distinct input (q/k/v, then o, then
gate/up, then down: the order their inputs are first computed). Each round's Hessian is
measured on the block as it is *now* (earlier rounds rounded and tuned), and after each round
what is still continuous is trained to recover the fp block's outputs on the calibration
activations: the in_scale and per-row gain of every linear rounded so far (their codes
fixed) and the weights of the linears not rounded yet (which the next rounds then round).
The loss is each token's squared error relative to the fp output's squared norm, averaged over
tokens: what the next RMSNorm (every later block's, and the final one's) sees, since it divides
each token by its rms. A plain mean square would be ruled by the few tokens and channels with
massive activations (attention sinks), whose errors the norms divide away. The last
calibration batch is held out, and a round keeps its trained values only if they
lower the held-out loss. Seeded; deterministic on the CPU for a given thread count.

What it stores is what plain rounding stores (codes, fp16 scales, in_scale): the trained
values are folded in (TunableQuipLinear.apply_to), so resuming and every backend are unchanged.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.modules import QuipLinearRef

from ..config import QuantConfig
from ..distributed import SINGLE, Group
from .finetune import FinetuneConfig, TunableQuipLinear
from .input_siblings import input_siblings, tie_input_scales, unique_parameters
from .sequential import first_window, run_block


def input_rounds(block: nn.Module, inputs, names: list[str]) -> list[list[str]]:
    """`names` grouped by the tensor they read, in the order those inputs are first computed."""
    h, a, kw = first_window(inputs)
    return input_siblings(block, names, lambda: block(h, *a, **kw))


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |out_t - target_t|^2 / |target_t|^2 (the last axis is the hidden one)."""
    target = target.float()
    err = (out.float() - target).pow(2).sum(-1)
    return (err / target.pow(2).sum(-1).clamp_min(1e-30)).mean()


class _Trainer:
    """Adam on the block's continuous parameters against the fp block's outputs."""

    def __init__(self, block: nn.Module, inputs, targets: list[torch.Tensor], cfg, seed: int):
        self.block, self.inputs, self.targets, self.cfg = block, inputs, targets, cfg
        n = len(inputs.hidden)
        self.held = [n - 1] if n >= 2 else []
        self.train = list(range(n - 1)) if n >= 2 else list(range(n))
        self.order = torch.Generator().manual_seed(seed)

    def _out(self, i: int) -> torch.Tensor:
        out = self.block(self.inputs.hidden[i], *self.inputs.args[i], **self.inputs.kwargs[i])
        return out[0] if isinstance(out, (tuple, list)) else out

    def held_loss(self) -> float:
        if not self.held:
            return float("nan")
        with torch.no_grad():
            return float(sum(block_loss(self._out(i), self.targets[i]) for i in self.held) / len(self.held))

    def run(self, groups: list[dict]) -> dict:
        """groups: Adam parameter groups ({"params": [...], "lr": ...}). Returns the round's record."""
        params = [p for g in groups for p in g["params"]]
        if not params or self.cfg.block_steps == 0:
            return {"steps": 0}
        before = self.held_loss()
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(groups)
        losses = []
        steps = 0
        while steps < self.cfg.block_steps:
            for i in torch.randperm(len(self.train), generator=self.order).tolist():
                if steps == self.cfg.block_steps:
                    break
                loss = block_loss(self._out(self.train[i]), self.targets[self.train[i]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                steps += 1
        for p in params:
            p.requires_grad_(False)
        after = self.held_loss()
        kept = not self.held or after < before
        if not kept:   # the held-out batch got worse: keep the values the round started from
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
        return {"steps": steps, "train_first": losses[0], "train_last": losses[-1],
                "held_before": before, "held_after": after, "kept": kept}


def round_block_tuned(block: nn.Module, inputs, names: list[str], full_names: dict[str, str], cfg: QuantConfig,
                      encode: Callable, calibrate: Callable, group: Group = SINGLE,
                      ft: FinetuneConfig | None = None) -> tuple[list[QuantizedLinear], dict]:
    """The block's linears rounded round by round with tuning in between (module docstring).
    encode(block, names, hessians) -> layers (passes/spread.encode_block);
    calibrate(block, names) -> {name: Hessian} (passes/sequential.calibrate_block).
    The block's linears are left as they were found (nn.Linear, the last round's fp weights
    of the linears then rounded); the caller installs the returned layers. Returns the layers
    in `names` order and a record of each round. ft: the settings (default cfg's)."""
    if group.world > 1:
        raise ValueError("block fine-tuning runs in one process (its gradients are not shared over "
                         "ranks yet); drop --workers / torchrun, or use --finetune e2e")
    ft = ft or cfg.finetune_config()
    t0 = time.time()
    with torch.no_grad():
        targets = [t.detach() for t in run_block(block, inputs)]
    for p in block.parameters():
        p.requires_grad_(False)
    trainer = _Trainer(block, inputs, targets, ft, seed=ft.seed)
    originals = {n: block.get_submodule(n) for n in names}
    tunables: dict[str, TunableQuipLinear] = {}
    layers: dict[str, QuantizedLinear] = {}
    record = []
    try:
        rounds = input_rounds(block, inputs, names)
        for r, rnames in enumerate(rounds):
            hess = calibrate(block, rnames)
            for layer, n in zip(encode(block, rnames, hess), rnames):
                layers[n] = layer
                tunables[n] = TunableQuipLinear(QuipLinearRef(layer).to(originals[n].weight.device))
                block.set_submodule(n, tunables[n])
            if ft.tie_inputs:   # a round is the linears reading one tensor
                tie_input_scales(tunables, [rnames])
            if r == len(rounds) - 1 and not ft.block_last_round:
                break
            pending = [originals[n] for rnd in rounds[r + 1:] for n in rnd]
            groups = [{"params": unique_parameters(p for t in tunables.values() for p in (t.in_scale, t.row_gain)),
                       "lr": ft.block_lr}]
            groups += [{"params": [lin.weight], "lr": ft.block_lr * float(lin.weight.pow(2).mean().sqrt())}
                       for lin in pending]
            record.append({"round": rnames, **trainer.run(groups)})
    finally:
        for n, mod in originals.items():
            block.set_submodule(n, mod)
    out = [tunables[n].apply_to(layers[n]) for n in names]
    return out, {"rounds": record, "seconds": time.time() - t0}
