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


@contextmanager
def compact_linear_weights(module: nn.Module, enabled: bool = True):
    """While inside: each float32 nn.Linear weight of `module` whose values float16 or bfloat16
    holds exactly (a checkpoint stored in either and loaded as float32, as transformers and the
    streaming frontend load them) is kept in that type, half its bytes; every forward call of
    the linear upcasts it for the call and drops the upcast after it. Inside, `weight.data` is
    the narrow tensor (the same values); yields the set of modules held so. A weight replaced
    inside (`weight.data = ...`, as sequential.install_quantized does) stays as replaced; the
    others are float32 again on exit.

    A compile holds a block's weights beside its largest Hessian while rounding; in a 7B block
    this is 0.4 GB of the peak (issue 14)."""
    kept: list[tuple[nn.Linear, torch.Tensor, list]] = []
    try:
        for mod in module.modules() if enabled else ():
            if not isinstance(mod, nn.Linear) or mod.weight.dtype != torch.float32:
                continue
            narrow = _exact_narrow(mod.weight.data)
            if narrow is None:
                continue
            mod.weight.data = narrow
            handles = [mod.register_forward_pre_hook(lambda m, _a, n=narrow: _set_weight(m, n.to(torch.float32))),
                       mod.register_forward_hook(lambda m, _a, _o, n=narrow: _set_weight(m, n))]
            kept.append((mod, narrow, handles))
        return_freed_memory()
        yield {mod for mod, _, _ in kept}
    finally:
        for mod, narrow, handles in kept:
            for h in handles:
                h.remove()
            if mod.weight.data_ptr() == narrow.data_ptr():     # not replaced inside
                _set_weight(mod, narrow.to(torch.float32))


def _exact_narrow(w: torch.Tensor) -> torch.Tensor | None:
    for dtype in COMPACT_DTYPES:
        narrow = w.to(dtype)
        if torch.equal(narrow.to(w.dtype), w):
            return narrow
    return None


def _set_weight(mod: nn.Linear, value: torch.Tensor) -> None:
    mod.weight.data = value
