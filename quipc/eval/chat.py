"""Chat turns through the model's own chat template: what `quipc chat` prints (one turn, or a
conversation) and what the answer-agreement metric (quipc.eval.agreement) compares. Greedy, so it
is reproducible."""
from __future__ import annotations

import numpy as np
import torch


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, L) input ids of one user turn with the generation prompt; a tokenizer without a
    chat template gets the plain prompt (a base model)."""
    if getattr(tokenizer, "chat_template", None):
        return conversation_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a conversation runs through the model's chat template, and this tokenizer has none "
                         "(give the prompt on the command line for one plain turn)")


def conversation_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """(1, L) input ids of a conversation (role / content messages) with the generation prompt."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


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
    return reply_ids(model, tokenizer, ids, max_new_tokens)


def reply_ids(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The greedy continuation of input ids (1, L) as token ids, cut at the first end-of-sequence
    token (answer_ids' model kinds)."""
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


def converse(model, tokenizer, turns, max_new_tokens: int, write) -> list[dict]:
    """A conversation: each of `turns` (user messages; an empty one ends it) goes through the chat
    template after the earlier turns and answers, and `write` gets each answer's text. Every turn
    runs the whole conversation again (the backends' generate() starts from an empty cache).
    Returns the conversation's messages."""
    messages = []
    for turn in turns:
        text = turn.strip()
        if not text:
            break
        messages.append({"role": "user", "content": text})
        answer = tokenizer.decode(reply_ids(model, tokenizer, conversation_ids(tokenizer, messages), max_new_tokens))
        write(answer)
        messages.append({"role": "assistant", "content": answer})
    return messages
