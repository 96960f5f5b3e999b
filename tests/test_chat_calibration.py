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


def test_text_calibration_with_a_chat_share(tiny_model, tmp_path, monkeypatch):
    """--calib FILE --calib-chat 0.5: half the windows from the file, half conversations the
    model writes, alternating; recorded in the manifest; the job key of a share-free compile
    is the one it had before the option existed."""
    import hashlib
    import json
    import shutil

    from transformers import AutoTokenizer

    from quipc.compile import CalibConfig, _job_key, compile_model
    from quipc.config import QuantConfig
    from quipc_runtime import artifact as art

    monkeypatch.setattr(cc, "ANSWER_TOKENS", 8)
    folder, text = tiny_model
    chat_folder = tmp_path / "chat-model"
    shutil.copytree(folder, chat_folder)
    tok = AutoTokenizer.from_pretrained(chat_folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat_folder)
    calib = CalibConfig(text=str(text), windows=4, length=32, chat=0.5)
    seen = {}
    real = calibration.interleave
    monkeypatch.setattr(calibration, "interleave", lambda t, c: seen.setdefault("w", real(t, c)))
    compile_model(str(chat_folder), tmp_path / "a", QuantConfig(bits=4, finetune="none"), calib, progress=False)
    info = art.read_manifest(tmp_path / "a")["calibration"]
    assert info["windows"] == 4 and info["chat_windows"] == 2 and info["source"] == "calib.txt"
    windows = seen["w"]
    file_windows = calibration.text_windows(tok, text, 2, 32)
    prefix = torch.tensor(cc.user_prefix_ids(tok))
    assert torch.equal(windows[0], file_windows[0]) and torch.equal(windows[2], file_windows[1])
    assert torch.equal(windows[1, : len(prefix)], prefix)   # conversations packed back to back
    assert not any(torch.equal(windows[3], w) for w in calibration.text_windows(tok, text, None, 32))
    # no chat share: the key does not name the field (old folders resume), a share changes it
    plain = CalibConfig(text=str(text), windows=4, length=32)
    quant = QuantConfig().to_dict()
    for key in ("head_format", "head_int8_rows", "finetune_step_windows", "finetune_lr", "head_refit_damp",
                "finetune_tie_inputs"):
        del quant[key]   # nor defaults added since
    before = json.dumps({"source": {}, "quant": quant, "calib": {
        "text": str(text), "windows": 4, "length": 32, "batch": 8}}, sort_keys=True)
    assert _job_key({}, QuantConfig(), plain) == hashlib.sha256(before.encode()).hexdigest()
    assert _job_key({}, QuantConfig(), plain) != _job_key({}, QuantConfig(), calib)
    with pytest.raises(ValueError, match="calibration text file"):
        CalibConfig(chat=0.5).validate()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CalibConfig(text=str(text), chat=1.0).validate()
