"""Compile's peak resident memory (issue 14): handing freed memory back to the system, and
keeping a block's weights in the narrow type they came in."""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

import torch
from torch import nn

_LIBC = None


def return_freed_memory() -> None:
    """glibc's malloc keeps freed chunks in its heap (its mmap threshold rises after the first
    big free, so later temporaries up to 32 MB come from the heap too): without a trim the
    resident memory grew by about a block per block and stayed a layer's temporaries above
    what is live (measured). Called after each block and each rounded linear. No-op without glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# Narrower types tried, in order, for a float32 weight that one of them holds exactly.
COMPACT_DTYPES = (torch.float16, torch.bfloat16)


class NarrowedWeights:
    """The linears held narrow by compact_linear_weights (`mod in narrowed`, iteration): each
    with its narrow tensor and the hooks that upcast it for a forward call."""

    def __init__(self):
        self._held: dict[nn.Linear, tuple[torch.Tensor, list]] = {}

    def hold(self, mod: nn.Linear, narrow: torch.Tensor) -> None:
        mod.weight.data = narrow
        handles = [mod.register_forward_pre_hook(lambda m, _a, n=narrow: _set_weight(m, n.to(torch.float32))),
                   mod.register_forward_hook(lambda m, _a, _o, n=narrow: _set_weight(m, n))]
        self._held[mod] = (narrow, handles)

    def replace(self, mod: nn.Linear, value: torch.Tensor) -> None:
        """mod's weight becomes `value` for good: hooks removed, the narrow tensor let go
        (installing a block frees each original weight as its replacement arrives)."""
        _set_weight(mod, value)
        _, handles = self._held.pop(mod, (None, ()))
        for h in handles:
            h.remove()

    def drop(self, mod: nn.Linear) -> None:
        """mod's original weight is read no more (its linear is rounded; installing gives it
        its effective weight): the narrow tensor goes now, an empty float32 one (the weight's
        type outside) stands in until then. A weight not held here is left alone."""
        if mod in self._held:
            self.replace(mod, torch.empty(0, dtype=torch.float32, device=mod.weight.device))

    def restore_all(self) -> None:
        """Every weight still held narrow is float32 again (one assigned otherwise meanwhile
        stays as assigned), hooks removed."""
        for mod, (narrow, _) in list(self._held.items()):
            held = mod.weight.data_ptr() == narrow.data_ptr()
            self.replace(mod, narrow.to(torch.float32) if held else mod.weight.data)

    def __contains__(self, mod) -> bool:
        return mod in self._held

    def __iter__(self):
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)


@contextmanager
def compact_linear_weights(module: nn.Module, enabled: bool = True):
    """While inside: each float32 nn.Linear weight of `module` whose values float16 or bfloat16
    holds exactly (a checkpoint stored in either and loaded as float32, as transformers and the
    streaming frontend load them) is kept in that type, half its bytes; every forward call of
    the linear upcasts it for the call and drops the upcast after it. Inside, `weight.data` is
    the narrow tensor (the same values); yields the NarrowedWeights held so. A weight replaced
    inside through `narrowed.replace(mod, value)` (as sequential.install_quantized does) stays
    as replaced and its narrow tensor is freed at once, as is one dropped (`narrowed.drop(mod)`,
    its linear rounded: an empty weight until installed); the others are float32 again on exit.

    A compile holds a block's weights beside its largest Hessian while rounding; in a 7B block
    this is 0.4 GB of the peak (issue 14)."""
    narrowed = NarrowedWeights()
    try:
        for mod in module.modules() if enabled else ():
            if not isinstance(mod, nn.Linear) or mod.weight.dtype != torch.float32:
                continue
            narrow = _exact_narrow(mod.weight.data)
            if narrow is not None:
                narrowed.hold(mod, narrow)
        return_freed_memory()
        yield narrowed
    finally:
        narrowed.restore_all()


def _exact_narrow(w: torch.Tensor) -> torch.Tensor | None:
    for dtype in COMPACT_DTYPES:
        narrow = w.to(dtype)
        if torch.equal(narrow.to(w.dtype), w):
            return narrow
    return None


def _set_weight(mod: nn.Linear, value: torch.Tensor) -> None:
    mod.weight.data = value
