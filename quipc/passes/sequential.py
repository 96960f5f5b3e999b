"""Block-by-block calibration and quantization.

Block l is calibrated on the outputs of blocks 0..l-1 *after* they were quantized, and
only one block sits on the compute device at a time: the activations of the calibration
windows are the only state carried from block to block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from quipc_runtime.layer import QuantizedLinear

from ..config import QuantConfig
from ..distributed import SINGLE, Group
from ..frontend.trace import find_blocks, linears_in_order
from ..memory import NarrowedWeights, compact_linear_weights, return_freed_memory
from .hessian import batch_partial, reduce_in_batch_order
from .input_siblings import tensor_key
from .methods import quantize_linear
from .spread import encode_block
from .teacher import TeacherStates


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering a block, and the other
    arguments the model passed to its blocks (positions, masks, rotary tables)."""
    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    batch_ids: list[int] = None     # which calibration batches these are (default 0, 1, ...)
    n_batches: int = None           # batches over all ranks

    def __post_init__(self):
        if self.batch_ids is None:
            self.batch_ids = list(range(len(self.hidden)))
        if self.n_batches is None:
            self.n_batches = len(self.hidden)


def capture_first_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                               batch: int, device, group: Group = SINGLE) -> BlockInputs:
    """The first block's inputs for the calibration batches of this rank (batch b of
    `batch` windows belongs to rank group.owner(b))."""
    hidden, args, kwargs = [], [], []
    n_batches = -(-windows.shape[0] // batch)
    mine = group.mine(n_batches)

    def grab(_mod, a, kw):
        hidden.append(a[0] if a else kw.pop("hidden_states"))
        args.append(tuple(a[1:]))
        kwargs.append(dict(kw))
        raise _StopForward

    hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in (b * batch for b in mine):
                try:
                    model(input_ids=windows[start:start + batch].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        hook.remove()
    return BlockInputs(hidden, args, kwargs, mine, n_batches)


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
            out = block(h, *a, **kw)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


class HessianHooks:
    """Per calibration batch, x^T x for each distinct input of the named linears; linears fed
    the very same tensor (q/k/v, gate/up) share one accumulator, so x^T x is computed once
    per distinct input. Accumulators are numbered in the order their inputs are first seen.
    A batch's forward stops once each named linear has been called as often as in the first,
    complete batch: the layers after the last of them (a round of block fine-tuning measures
    q/k/v, then o, ...) add nothing to these Hessians."""

    def __init__(self, block: nn.Module, names: list[str]):
        self.calls = dict.fromkeys(names, 0)     # this batch's calls of each named linear
        self.expected: dict[str, int] | None = None   # the first complete batch's
        self.group_of: dict[str, int] = {}
        self.dims: list[int] = []
        self.batch: dict[int, list] = {}    # accumulator -> [x^T x, rows] of the current batch
        self._seen: dict[tuple, tuple] = {}
        modules = dict(block.named_modules())
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(_mod, inp):
            self._accumulate(name, inp[0])
            self.calls[name] += 1
            if self.expected is not None and all(self.calls[n] >= c for n, c in self.expected.items()):
                raise _StopForward
        return fn

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        key = tensor_key(x)
        if key in self._seen:
            self.group_of.setdefault(name, self._seen[key][0])
            return
        g = self.group_of.get(name)
        if g is None:
            g = self.group_of[name] = len(self.dims)
            self.dims.append(x.shape[-1])
        total, rows = batch_partial(x)
        if g in self.batch:
            self.batch[g][0] += total
            self.batch[g][1] += rows
        else:
            self.batch[g] = [total, rows]
        # holding x keeps its memory from being reused by a later input in this batch,
        # which would make a different tensor look like the same one
        self._seen[key] = (g, x)

    def run_batch(self, block: nn.Module, h, a, kw) -> dict[int, list]:
        self._seen.clear()
        self.batch = {}
        self.calls = dict.fromkeys(self.calls, 0)
        try:
            with torch.no_grad():
                block(h, *a, **kw)
            if self.expected is None:
                self.expected = dict(self.calls)
        except _StopForward:
            pass
        self._seen.clear()
        return self.batch

    def remove(self):
        for h in self.handles:
            h.remove()


def calibrate_block(block: nn.Module, inputs: BlockInputs, names: list[str],
                    group: Group = SINGLE) -> dict[str, torch.Tensor]:
    """E[x x^T] of each named linear's input over every rank's calibration batches, summed
    in batch order (passes/hessian.reduce_in_batch_order): the same floats for any world size."""
    hooks = HessianHooks(block, names)
    where = dict(zip(inputs.batch_ids, range(len(inputs.hidden))))
    device = next(block.parameters()).device

    def partials_of(b: int):
        i = where[b]
        part = hooks.run_batch(block, inputs.hidden[i], inputs.args[i], inputs.kwargs[i])
        return [part[g] for g in range(len(hooks.dims))]

    try:
        # every rank runs its first batch at once; rank 0's (batch 0's) layout is the one used
        # (a rank without batches takes it; one that traced another stops the compile)
        own = inputs.batch_ids[0] if inputs.batch_ids else None
        first = partials_of(own) if own is not None else None
        layout = group.broadcast_object((hooks.group_of, hooks.dims) if group.is_main else None)
        if own is not None and (hooks.group_of, hooks.dims) != layout:
            raise RuntimeError(f"rank {group.rank}: the block's linears read other inputs here than on rank 0 "
                               f"({hooks.dims} vs {layout[1]})")
        hooks.group_of, hooks.dims = layout
        accs = reduce_in_batch_order(group, inputs.n_batches,
                                     lambda b: first if b == own else partials_of(b), hooks.dims, device)
    finally:
        hooks.remove()
    means = [acc.mean_() for acc in accs]
    return {name: means[g] for name, g in hooks.group_of.items()}


def install_quantized(block: nn.Module, layers: dict[str, QuantizedLinear],
                      narrowed: NarrowedWeights | None = None) -> None:
    """Make the block compute what the stored layers compute (their effective weights), each
    weight replaced by a new tensor of its dtype (float32 for the modules `narrowed`, held in a
    16-bit type by memory.compact_linear_weights, whose narrow originals go as they are
    replaced), one layer at a time."""
    modules = dict(block.named_modules())
    for name, layer in layers.items():
        mod = modules[name]
        w = torch.from_numpy(layer.effective_weight())
        if narrowed is not None and mod in narrowed:
            narrowed.replace(mod, w.to(device=mod.weight.device, dtype=torch.float32))
        else:
            mod.weight.data = w.to(device=mod.weight.device, dtype=mod.weight.dtype)
        del w
        return_freed_memory()


def quantize_model(model: nn.Module, windows: torch.Tensor | None, cfg: QuantConfig, *,
                   device="cpu", batch: int = 8, done: Mapping[int, list[QuantizedLinear]] | None = None,
                   on_block: Callable[[int, list[QuantizedLinear]], None] | None = None,
                   progress=None,
                   on_final: Callable[[BlockInputs | None], None] | None = None,
                   stream=None, group: Group = SINGLE, teacher: bool = False,
                   spill_dir=None) -> dict[int, torch.Tensor] | None:
    """Quantize every decoder block's linears; `done` holds blocks finished by an earlier,
    interrupted run (they are installed, not recomputed; read on rank 0 only); on_block saves
    each new block (rank 0); on_final gets the last (quantized) block's outputs of this rank's
    batches (None without calibration), while the model is still on the device.

    stream (frontend/streaming.StreamedModel): block i is read from the checkpoint before its
    turn and freed after it. group: the ranks of a distributed compile (distributed.py), which
    share the calibration batches and the rounding. teacher: also carry the fp hidden states of
    every window (passes/teacher.py); returns them on every rank ({window: hidden}), else None.
    spill_dir: where a block's large Hessians wait for their turn (passes/spread.SPILL_BYTES)."""
    done = done or {}
    prefix, blocks = find_blocks(model)
    needs_h = cfg.method != "rtn"
    cpu = torch.device("cpu")
    _move_except(model, blocks, device)
    inputs = capture_first_block_inputs(model, blocks, windows, batch, device, group) if needs_h else None
    fp_states = TeacherStates(model, blocks, windows, device, group) if teacher else None
    done_indices = group.broadcast_object(sorted(done) if group.is_main else None)
    for index in range(len(blocks)):
        block = stream.load_block(index) if stream is not None else blocks[index]
        block.to(device)
        if fp_states is not None:
            fp_states.step(block)
        names = group.broadcast_object(_block_linears(block, inputs) if group.is_main else None)
        full = {n: f"{prefix}.{index}.{n}" for n in names}
        # the block's weights in their checkpoint's 16-bit type beside its Hessians (quipc/memory.py),
        # each replaced by its float32 effective weight when installed (block fine-tuning trains them: float32;
        # a block resumed from disk is only installed: nothing to hold narrow)
        compact = index not in done_indices and not (needs_h and cfg.finetune_config().block)
        with compact_linear_weights(block, enabled=compact) as narrowed:
            if index in done_indices:
                layers = group.broadcast_object(done[index] if group.is_main else None)
            else:
                # each original freed once its linear is rounded (a rounding that fails leaves those
                # empty: the compile stops, and a resumed one reads the checkpoint again)
                modules = dict(block.named_modules())
                layers = _round_block(block, inputs, names, full, cfg, group, needs_h, spill_dir,
                                      weight_done=lambda name: narrowed.drop(modules[name]))
                if on_block is not None and group.is_main:
                    on_block(index, layers)
            install_quantized(block, {layer.name[len(f"{prefix}.{index}."):]: layer for layer in layers}, narrowed)
            del layers
        if needs_h:
            inputs.hidden = run_block(block, inputs)
        block.to(cpu)
        if stream is not None:
            stream.release_block(index)
        if progress is not None:
            progress.update(1)
    if on_final is not None:
        on_final(inputs)
    _move_except(model, blocks, cpu)
    if stream is None:
        model.to(cpu)
    return fp_states.gather(group) if fp_states is not None else None


def _round_block(block: nn.Module, inputs: BlockInputs | None, names: list[str], full: dict[str, str],
                 cfg: QuantConfig, group: Group, needs_h: bool, spill_dir=None,
                 weight_done=None) -> list[QuantizedLinear]:
    """The block's linears rounded: all from one calibration, or (block fine-tuning) round by
    round with tuning in between (passes/block_finetune.py). weight_done: as in
    spread.encode_block (one calibration only: block fine-tuning reads the weights again)."""
    def encode(blk, rnames, hess, done=None):
        return encode_block(blk, rnames, hess, full, cfg, group, quantize=quantize_linear, spill_dir=spill_dir,
                            weight_done=done)

    if not (needs_h and cfg.finetune_config().block):
        return encode(block, names, calibrate_block(block, inputs, names, group) if needs_h else {}, weight_done)
    from .block_finetune import round_block_tuned

    layers, record = round_block_tuned(block, inputs, names, full, cfg, encode,
                                       lambda blk, rnames: calibrate_block(blk, inputs, rnames, group), group)
    summary = {"seconds": round(record["seconds"], 2),
               "held_out": [[r.get("held_before"), r.get("held_after"), r.get("kept")] for r in record["rounds"]]}
    for layer in layers:
        layer.info = {**layer.info, "block_finetune": summary}
    return layers


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


def first_window(inputs: BlockInputs) -> tuple[torch.Tensor, tuple, dict]:
    """The block arguments of the first calibration window alone (batch-sized kwargs sliced)."""
    h, a, kw = inputs.hidden[0][:1], inputs.args[0], inputs.kwargs[0]
    kw = {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == inputs.hidden[0].shape[0] else v)
          for k, v in kw.items()}
    return h, a, kw


def _block_linears(block: nn.Module, inputs: BlockInputs | None) -> list[str]:
    if inputs is not None:
        h, a, kw = first_window(inputs)
        return linears_in_order(block, lambda: block(h, *a, **kw))
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]  # definition order
