"""Answer agreement (PROTOCOL "Answer agreement"): greedy answers of a quantized chat model
against the unquantized model's, scored by ROUGE-L F1 over token ids.

Perplexity hides what a chat user sees; this compares the answers themselves. Each prompt
is one user turn through the model's own chat template with the generation prompt, no
system prompt added; at most 48 new tokens, greedy; the answer stops at the first
end-of-sequence token.
"""
from __future__ import annotations

import time

import torch

from .chat import answer_ids, prompt_ids, stop_ids

# Short instructions with short, checkable answers (facts, arithmetic, language, code).
PROMPTS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "Name the largest planet in our solar system.",
    "What is 12 plus 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for 'happy'.",
    "What color do you get when you mix blue and yellow?",
    "Who wrote 'Romeo and Juliet'?",
    "What is the boiling point of water in Celsius?",
    "List three fruits.",
    "What is the opposite of 'cold'?",
    "Write a Python function that returns the square of a number.",
    "What does a thermometer measure?",
    "How many legs does a spider have?",
    "What is the chemical symbol for gold?",
    "Summarize in one sentence: The cat sat on the mat because it was warm.",
    "What is the freezing point of water in Fahrenheit?",
    "Which ocean is the largest?",
    "Give one tip for staying healthy.",
    "What is the plural of 'mouse'?",
    "Explain what a noun is in one sentence.",
    "What is the square root of 81?",
    "Name a mammal that can fly.",
    "Complete the sentence: The sun rises in the ...",
]
MAX_NEW_TOKENS = 48


def lcs_length(a: list[int], b: list[int]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(a: list[int], b: list[int]) -> float:
    """2 * LCS / (len a + len b); 1.0 for two identical (or two empty) answers."""
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def chat_answers(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Greedy answers as token-id lists (end-of-sequence tokens and what follows dropped)."""
    return [answer_ids(model, tokenizer, prompt, max_new_tokens) for prompt in prompts]


def agreement(answers: list[list[int]], reference: list[list[int]]) -> dict:
    if len(answers) != len(reference):
        raise ValueError(f"{len(answers)} answers against {len(reference)} reference answers")
    scores = [rouge_l_f1(a, r) for a, r in zip(answers, reference)]
    return {"rouge_l": sum(scores) / len(scores), "identical": sum(a == r for a, r in zip(answers, reference)),
            "prompts": len(scores), "per_prompt": scores}


def forced_agreement(model, tokenizer, reference: list[list[int]], prompts=PROMPTS,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The reference answers fed to `model` (a torch causal LM) after their prompts: the share
    of answer positions where its greedy choice is the reference's token, and the mean negative
    log-likelihood of those tokens. An answer shorter than max_new_tokens ended at an
    end-of-sequence token, which is scored too. Unlike ROUGE-L over free-running answers, where
    the first different token changes all that follows, every position is scored on the same
    text, so close models compare with far less noise."""
    if len(prompts) != len(reference):
        raise ValueError(f"{len(prompts)} prompts against {len(reference)} reference answers")
    stops = stop_ids(tokenizer)
    eos = min(stops) if stops else None
    device = next(model.parameters()).device
    hits, nll, count = 0, 0.0, 0
    for prompt, ref in zip(prompts, reference):
        ids = prompt_ids(tokenizer, prompt)[0].tolist()
        target = list(ref) + ([eos] if len(ref) < max_new_tokens and eos is not None else [])
        if not target:
            continue
        x = torch.tensor([ids + target[:-1]], device=device)
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits[0, len(ids) - 1:].float()
        want = torch.tensor(target, device=device)
        hits += int((logits.argmax(-1) == want).sum())
        nll += float(torch.nn.functional.cross_entropy(logits, want, reduction="sum"))
        count += len(target)
    return {"forced_top1": hits / count, "forced_nll": nll / count, "forced_tokens": count}


def timed_answers(model, tokenizer) -> tuple[list[list[int]], float]:
    t0 = time.time()
    return chat_answers(model, tokenizer), time.time() - t0
