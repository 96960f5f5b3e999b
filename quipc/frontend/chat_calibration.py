"""Data-free calibration for chat models: conversations the model writes itself.

Text sampled from a random first token never contains the chat template, so a model
calibrated (and fine-tuned) on it only alone keeps its free-text statistics and can lose
its chat behaviour: SmolLM2 w2 calibrated that way answered every chat prompt with an
immediate end-of-turn. Here the model writes both sides of each conversation through its
own template: it samples a user turn from the template's user prefix, then answers it
after the template's generation prompt, and the conversations (end-of-turn tokens
included) are packed back to back into calibration windows.
"""
from __future__ import annotations

import torch

MARK = "\x00quipc-user-turn\x00"
QUESTION_TOKENS = 48
ANSWER_TOKENS = 192


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_prefix_ids(tokenizer) -> list[int]:
    """Token ids the template puts before a user's words (system prompt included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                         add_generation_prompt=False)
    if MARK not in text:
        raise ValueError("the chat template does not show the user's message verbatim")
    return tokenizer(text[: text.index(MARK)], add_special_tokens=False)["input_ids"]


def _until_stop(row: list[int], stop: int, keep_stop: bool) -> list[int]:
    if stop in row:
        row = row[: row.index(stop) + (1 if keep_stop else 0)]
    return row


def _sample(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, stop: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, do_sample=True, top_k=50, temperature=1.0,
                          max_new_tokens=new_tokens, use_cache=True, pad_token_id=stop)


def conversations(model, tokenizer, count: int, device) -> list[list[int]]:
    """`count` conversations (ids: the template's prompt, the answer, its end-of-turn token),
    sampled with the caller's torch RNG state."""
    stop = tokenizer.eos_token_id
    stop = stop[0] if isinstance(stop, list) else stop
    prefix = torch.tensor([user_prefix_ids(tokenizer)] * count, device=device)
    asked = _sample(model, prefix, torch.ones_like(prefix), QUESTION_TOKENS, stop)[:, prefix.shape[1]:]
    prompts = []
    for row in asked.tolist():
        question = tokenizer.decode(_until_stop(row, stop, keep_stop=False), skip_special_tokens=True)
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": question.strip()}],
                                                     add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
    width = max(len(p) for p in prompts)         # left padding: every answer starts at `width`
    ids = torch.tensor([[stop] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    answers = _sample(model, ids, mask, ANSWER_TOKENS, stop)[:, width:]
    return [p + _until_stop(a, stop, keep_stop=True) for p, a in zip(prompts, answers.tolist())]


def chat_windows(model, tokenizer, n_windows: int, length: int, batch: int, progress=None) -> torch.Tensor:
    """(n_windows, length) windows of packed conversations."""
    device = next(model.parameters()).device
    tokens: list[int] = []
    need = n_windows * length
    while len(tokens) < need:
        before = len(tokens)
        for conv in conversations(model, tokenizer, batch, device):
            tokens.extend(conv)
        if progress is not None:
            progress.update(min(need, len(tokens)) // length - min(need, before) // length)
    return torch.tensor(tokens[:need], dtype=torch.long).view(n_windows, length)
