"""Perplexity per PROTOCOL: the whole text tokenized once (no special tokens),
consecutive non-overlapping windows of `ctx` tokens, each scored alone, loss over
positions 1..ctx-1, PPL = exp(total NLL / total predicted tokens)."""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..frontend.calibration import cut_windows, tokenize_file

# logits_fn: (1, L) int64 token ids -> (L, vocab) float logits (torch or numpy)
LogitsFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def eval_windows(tokenizer, text_path, ctx: int = 2048, windows: int | None = 16) -> torch.Tensor:
    return cut_windows(tokenize_file(tokenizer, text_path), windows, ctx, str(text_path))


def window_nll(logits, ids: torch.Tensor) -> float:
    """Summed NLL of ids[1:] given logits of positions 0..L-2 (float64 accumulation)."""
    logits = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -float(logp.gather(1, ids[1:, None]).double().sum())


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, progress: bool = True) -> dict:
    t0 = time.time()
    nll, count = 0.0, 0
    for ids in tqdm(windows, desc="eval", unit="window", disable=not progress):
        nll += window_nll(logits_fn(ids[None]), ids)
        count += ids.numel() - 1
    return {"ppl": math.exp(nll / count), "nll": nll, "windows": int(windows.shape[0]),
            "tokens": count, "ctx": int(windows.shape[1]), "seconds": time.time() - t0}


def torch_logits_fn(model) -> LogitsFn:
    device = next(model.parameters()).device

    def fn(ids: torch.Tensor):
        with torch.no_grad():
            return model(input_ids=ids.to(device), use_cache=False).logits[0].cpu()
    return fn
