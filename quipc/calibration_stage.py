"""The compile's calibration windows: read from a text file and/or written by the model itself
(data-free), and what the manifest records of them.

The windows come in independent parts, each from its own seed (free text, conversations, the
text file), so a distributed compile writes them at once: part k on rank k % world (a rank
holds the whole model while it writes), and every rank joins the parts in the same order. The
tokens are those one process writes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibration_cache import cached_windows, kept_message, model_fingerprint, part_key
from .distributed import SINGLE, Group, spread
from .frontend import calibration
from .frontend.calibration import Part
from .frontend.models import file_sha256


def calibration_windows(stream, tokenizer, calib, seed: int, device, progress: bool,
                        group: Group = SINGLE, source=None) -> tuple[torch.Tensor, dict]:
    """(windows, info) on every rank; info names the tokens by sha256 (a generated text can come
    out different on another CPU or library version). With the model's `source`, text the model
    writes is kept on this machine for its next compile (calibration_cache.py)."""
    parts, info = _parts(tokenizer, calib, seed)
    model_files = None if source is None else model_fingerprint(source)

    def write(k: int) -> torch.Tensor:
        part, show = parts[k], progress and group.is_main
        key = None if model_files is None or part.settings is None else part_key(model_files, part.settings, device)
        windows, kept = cached_windows(key, part.windows, lambda: _write(stream, device, part, show))
        if kept and show:
            tqdm.write(kept_message(part.desc, part.windows))
        return windows

    windows = calibration.join_parts(spread(group, len(parts), write))
    return windows, {**info, "tokens_sha256": tokens_sha256(windows)}


def _parts(tokenizer, calib, seed: int) -> tuple[list[Part], dict]:
    if calib.text is not None:
        n_chat = calibration.chat_window_count(tokenizer, calib.windows, calib.chat)
        n_text = calib.windows - n_chat
        # named by file name and content, not by where it sat on the compiling machine
        info = {"source": Path(calib.text).name, "sha256": file_sha256(Path(calib.text)),
                "windows": n_text, "length": calib.length}
        parts = [Part(n_text, "read calibration text", needs_model=False, write=lambda _model, _bar:
                      calibration.text_windows(tokenizer, calib.text, n_text, calib.length))]
        if n_chat:
            parts.append(calibration.chat_part(tokenizer, n_chat, calib.length, seed))
            info = {**info, "windows": calib.windows, "chat_windows": n_chat, "seed": seed}
        return parts, info
    # data-free: the model writes the text
    return calibration.generated_parts(tokenizer, calib.windows, calib.length, seed), {
        "source": "generated", "seed": seed, "windows": calib.windows, "length": calib.length,
        "chat_windows": calibration.chat_window_count(tokenizer, calib.windows)}


def _write(stream, device, part: Part, progress: bool) -> torch.Tensor:
    """part.write(model, bar), with the model held whole on `device` while it writes (then freed):
    generation needs every block at once."""
    if not part.needs_model:
        return part.write(None, None)
    bar = tqdm(total=part.windows, desc=part.desc, unit="window", disable=not progress)
    try:
        with stream.fully_loaded() as model:
            model.to(device)
            windows = part.write(model, bar)
            model.to("cpu")
    finally:
        bar.close()
    return windows


def same_calibration(out: Path, manifest: dict | None, info: dict) -> None:
    """A resumed compile must round its remaining blocks on the tokens the interrupted run used:
    text the model generates from a seed can come out different on another CPU or library
    version (sampling follows float logits), and blocks rounded on two calibrations would mix."""
    was = (manifest or {}).get("calibration", {}).get("tokens_sha256")
    if was and was != info.get("tokens_sha256"):
        raise ValueError(f"{out}: the calibration tokens made now (sha256 {info.get('tokens_sha256', '?')[:12]}) "
                         f"differ from those the interrupted run used ({was[:12]}): generated text can differ "
                         "between CPUs or library versions; compile again without --resume, into a new folder")


def tokens_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
