"""A compile killed at a chosen call, as Ctrl-C would (the resume tests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def compile_killed_at(monkeypatch, owner, name: str, compile_args: tuple, compile_kwargs: dict) -> dict:
    """Run compile_model(*compile_args, **compile_kwargs) with owner.name raising KeyboardInterrupt,
    put owner.name back, and return the manifest the killed compile left in its output folder
    (compile_args[1])."""
    from quipc.compile import compile_model

    real = getattr(owner, name)

    def dies(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(owner, name, dies)
    with pytest.raises(KeyboardInterrupt):
        compile_model(*compile_args, **compile_kwargs)
    monkeypatch.setattr(owner, name, real)
    return json.loads((Path(compile_args[1]) / "manifest.json").read_text())
