"""One chat turn through the model's own chat template: what `quipc chat` prints and what
the answer-agreement metric (quipc.eval.agreement) compares. Greedy, so it is reproducible."""
from __future__ import annotations

import numpy as np
import torch


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, L) input ids of one user turn with the generation prompt; a tokenizer without a
    chat template gets the plain prompt (a base model)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def stop_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def answer_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy answer as token ids, cut at the first end-of-sequence token. `model` is a
    transformers causal LM (an artifact loaded by quipc_runtime, or the unquantized model) or
    a lowered one with a numpy `generate(ids, max_new_tokens, eos_token_id)` (OnnxLM, TvmLM)."""
    ids = prompt_ids(tokenizer, prompt)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty (no tokens, and the tokenizer has no chat template to wrap it)")
    stops = stop_ids(tokenizer)
    if isinstance(model, torch.nn.Module):
        ids = ids.to(next(model.parameters()).device)
        with torch.no_grad():
            # use_cache: the compile frontend's models carry use_cache=False (calibration forwards);
            # without the cache every step would recompute the whole sequence
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=next(iter(stops), 0), use_cache=True)
        gen = gen[0].tolist()
    else:   # stops at its own eos; any other stop token is cut below
        gen = model.generate(ids.numpy(), max_new_tokens, eos_token_id=min(stops) if stops else None)
        gen = [int(t) for t in np.asarray(gen).reshape(-1)]
    out = []
    for t in gen[ids.shape[1]:]:
        if t in stops:
            break
        out.append(t)
    return out
