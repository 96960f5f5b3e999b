"""Block-by-block calibration and quantization.

Block l is calibrated on the outputs of blocks 0..l-1 *after* they were quantized, and
only one block sits on the compute device at a time: the activations of the calibration
windows are the only state carried from block to block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from quipc_runtime.layer import QuantizedLinear

from ..config import QuantConfig
from ..frontend.trace import find_blocks, linears_in_order
from .hessian import HessianAccumulator
from .methods import LayerInput, quantize_linear


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering a block, and the other
    arguments the model passed to its blocks (positions, masks, rotary tables)."""
    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]


def capture_first_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                               batch: int, device) -> BlockInputs:
    hidden, args, kwargs = [], [], []

    def grab(_mod, a, kw):
        hidden.append(a[0] if a else kw.pop("hidden_states"))
        args.append(tuple(a[1:]))
        kwargs.append(dict(kw))
        raise _StopForward

    hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch):
                try:
                    model(input_ids=windows[start:start + batch].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        hook.remove()
    return BlockInputs(hidden, args, kwargs)


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
            out = block(h, *a, **kw)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


class HessianHooks:
    """Accumulates E[x x^T] for each linear; linears fed the very same tensor (q/k/v,
    gate/up) share one accumulator, so x^T x is computed once per distinct input."""

    def __init__(self, block: nn.Module, names: list[str]):
        self.accs: dict[str, HessianAccumulator] = {}
        self._seen: dict[tuple, HessianAccumulator] = {}
        modules = dict(block.named_modules())
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(_mod, inp):
            x = inp[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in self._seen:
                self.accs.setdefault(name, self._seen[key][0])
                return
            acc = self.accs.setdefault(name, HessianAccumulator(x.shape[-1], x.device))
            acc.add(x)
            # holding x keeps its memory from being reused by a later input in this batch,
            # which would make a different tensor look like the same one
            self._seen[key] = (acc, x)
        return fn

    def new_batch(self):
        self._seen.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def calibrate_block(block: nn.Module, inputs: BlockInputs, names: list[str]) -> dict[str, torch.Tensor]:
    hooks = HessianHooks(block, names)
    try:
        with torch.no_grad():
            for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
                hooks.new_batch()
                block(h, *a, **kw)
    finally:
        hooks.remove()
    means = {}
    for name, acc in hooks.accs.items():
        means.setdefault(id(acc), acc.mean())
    shared = {id(acc): means[id(acc)] for acc in hooks.accs.values()}
    return {name: shared[id(acc)] for name, acc in hooks.accs.items()}


def install_quantized(block: nn.Module, layers: dict[str, QuantizedLinear]) -> None:
    """Make the block compute what the stored layers compute (their effective weights)."""
    modules = dict(block.named_modules())
    for name, layer in layers.items():
        mod = modules[name]
        w = torch.from_numpy(layer.effective_weight()).to(mod.weight.dtype)
        mod.weight.data.copy_(w.to(mod.weight.device))


def quantize_model(model: nn.Module, windows: torch.Tensor | None, cfg: QuantConfig, *,
                   device="cpu", batch: int = 8, done: dict[int, list[QuantizedLinear]] | None = None,
                   on_block: Callable[[int, list[QuantizedLinear]], None] | None = None,
                   progress=None,
                   on_final: Callable[[BlockInputs | None], None] | None = None) -> list[list[QuantizedLinear]]:
    """Quantize every decoder block's linears; `done` holds blocks finished by an earlier,
    interrupted run (they are installed, not recomputed); on_block saves each new block;
    on_final gets the last (quantized) block's outputs (None without calibration), while
    the model is still on the device (lm_head's Hessian, passes/head.py)."""
    done = done or {}
    prefix, blocks = find_blocks(model)
    needs_h = cfg.method != "rtn"
    cpu = torch.device("cpu")
    _move_except(model, blocks, device)
    inputs = capture_first_block_inputs(model, blocks, windows, batch, device) if needs_h else None
    results = []
    for index, block in enumerate(blocks):
        block.to(device)
        names = _block_linears(block, inputs)
        full = {n: f"{prefix}.{index}.{n}" for n in names}
        if index in done:
            layers = done[index]
        else:
            hess = calibrate_block(block, inputs, names) if needs_h else {}
            modules = dict(block.named_modules())
            cache: dict[int, dict] = {}
            layers = []
            for n in names:
                h = hess.get(n)
                lin = modules[n]
                # rounding runs on the CPU in float64/32 whatever the calibration device
                bias = lin.bias.data.cpu() if lin.bias is not None else None
                inp = LayerInput(full[n], lin.weight.data.cpu(), bias,
                                 None if h is None else h.cpu(), cache.setdefault(id(h), {}))
                layers.append(quantize_linear(inp, cfg))
            if on_block is not None:
                on_block(index, layers)
        install_quantized(block, {layer.name[len(f"{prefix}.{index}."):]: layer for layer in layers})
        if needs_h:
            inputs.hidden = run_block(block, inputs)
        block.to(cpu)
        results.append(layers)
        if progress is not None:
            progress.update(1)
    if on_final is not None:
        on_final(inputs)
    model.to(cpu)
    return results


def _move_except(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Everything but the blocks onto the device (embeddings, rotary tables, final norm)."""
    for child in model.children():
        if child is blocks:
            continue
        if any(b is blocks for b in child.modules()):
            _move_except(child, blocks, device)
        else:
            child.to(device)
    for name, buf in list(model.named_buffers(recurse=False)):
        setattr(model, name, buf.to(device))


def _block_linears(block: nn.Module, inputs: BlockInputs | None) -> list[str]:
    if inputs is not None:
        h, a, kw = inputs.hidden[0][:1], inputs.args[0], inputs.kwargs[0]
        kw = {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == inputs.hidden[0].shape[0] else v)
              for k, v in kw.items()}
        return linears_in_order(block, lambda: block(h, *a, **kw))
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]  # definition order
