"""Test helpers that watch a function without changing what it does."""
from __future__ import annotations


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap owner.name so that each call appends to the returned list, then runs as before."""
    calls = []
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls
