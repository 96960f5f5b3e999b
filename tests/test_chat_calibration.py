"""Data-free calibration with conversations (quipc/frontend/chat_calibration.py): the model
writes user turns and answers through its own chat template; windows are deterministic."""
import pytest
import torch

from quipc.frontend import calibration, chat_calibration as cc

# roles as words of the tiny vocabulary: user "cat", assistant "dog"
TEMPLATE = ("{% for m in messages %}<s> {{ 'cat' if m['role'] == 'user' else 'dog' }} {{ m['content'] }} </s> "
            "{% endfor %}{% if add_generation_prompt %}<s> dog {% endif %}")


@pytest.fixture(scope="module")
def chat_pair(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model[0])
    tok.chat_template = TEMPLATE
    return AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32), tok


def test_conversations_follow_the_template(chat_pair, monkeypatch):
    model, tok = chat_pair
    monkeypatch.setattr(cc, "ANSWER_TOKENS", 5)
    prefix = cc.user_prefix_ids(tok)
    assert prefix == tok("<s> cat", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    convs = cc.conversations(model, tok, 6, torch.device("cpu"))
    gen_prompt = tok("<s> dog", add_special_tokens=False)["input_ids"]
    assert len(convs) == 6
    for conv in convs:
        assert conv[: len(prefix)] == prefix
        # the user turn (no special tokens in it) is closed by the template's </s>, then the
        # generation prompt, then the answer: at most 5 tokens, cut after its first </s>
        at = conv.index(tok.eos_token_id) + 1
        assert conv[at:at + len(gen_prompt)] == gen_prompt
        answer = conv[at + len(gen_prompt):]
        assert 1 <= len(answer) <= 5 and tok.eos_token_id not in answer[:-1]


def test_generated_windows_mix_chat_and_free_text_deterministically(chat_pair, monkeypatch):
    model, tok = chat_pair
    monkeypatch.setattr(cc, "ANSWER_TOKENS", 8)
    a = calibration.generated_windows(model, tok, 4, 16, seed=3, batch=4)
    b = calibration.generated_windows(model, tok, 4, 16, seed=3, batch=4)
    assert a.shape == (4, 16) and torch.equal(a, b)
    free = calibration.free_windows(model, tok, 2, 16, seed=3, batch=4)
    assert torch.equal(a[0], free[0]) and torch.equal(a[2], free[1])     # free, chat, free, chat
    prefix = torch.tensor(cc.user_prefix_ids(tok))
    assert torch.equal(a[1, : len(prefix)], prefix)                       # a conversation starts
    assert calibration.chat_window_count(tok, 4) == 2
    tok_plain = type(tok).from_pretrained(tok.name_or_path)
    tok_plain.chat_template = None
    assert calibration.chat_window_count(tok_plain, 4) == 0
    assert torch.equal(calibration.generated_windows(model, tok_plain, 2, 16, seed=3, batch=4),
                       calibration.free_windows(model, tok_plain, 2, 16, seed=3, batch=4))
