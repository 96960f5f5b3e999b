"""Handing freed memory back to the system (compile's peak resident memory, issue 14)."""
from __future__ import annotations

import ctypes

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
