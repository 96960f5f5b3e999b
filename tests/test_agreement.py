"""Answer agreement (quipc.eval.agreement): ROUGE-L F1 over token ids, and the answers' shape."""
import pytest
import torch

from quipc.eval.agreement import PROMPTS, agreement, chat_answers, lcs_length, rouge_l_f1


def test_lcs_and_rouge_l():
    assert lcs_length([1, 2, 3, 4], [2, 4]) == 2
    assert lcs_length([], [1]) == 0
    assert rouge_l_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l_f1([], []) == 1.0 and rouge_l_f1([], [5]) == 0.0
    assert rouge_l_f1([1, 2, 3, 4], [1, 3]) == pytest.approx(2 * 2 / 6)
    assert rouge_l_f1([7, 8], [9]) == 0.0


def test_agreement_summary_and_mismatch():
    result = agreement([[1, 2], [3]], [[1, 2], [4]])
    assert result == {"rouge_l": 0.5, "identical": 1, "prompts": 2, "per_prompt": [1.0, 0.0]}
    with pytest.raises(ValueError):
        agreement([[1]], [[1], [2]])
    assert len(PROMPTS) >= 20 and len(set(PROMPTS)) == len(PROMPTS)


def test_answers_stop_at_end_of_sequence(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model[0])
    if tok.chat_template is None:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32)
    answers = chat_answers(model, tok, prompts=["hi", "yes"], max_new_tokens=5)
    assert len(answers) == 2
    for a in answers:
        assert len(a) <= 5 and tok.eos_token_id not in a
    assert answers == chat_answers(model, tok, prompts=["hi", "yes"], max_new_tokens=5)  # greedy


def test_forced_agreement_of_a_model_with_its_own_answers(tiny_model):
    """Fed its own greedy answers, a model picks every answer token again (and the end of an
    answer cut short); another model's answers, or a perturbed model, score below 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quipc.eval.agreement import forced_agreement

    tok = AutoTokenizer.from_pretrained(tiny_model[0])
    if tok.chat_template is None:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32).eval()
    prompts = ["hi", "yes", "tell me"]
    own = chat_answers(model, tok, prompts=prompts, max_new_tokens=6)
    result = forced_agreement(model, tok, own, prompts=prompts, max_new_tokens=6)
    assert result["forced_top1"] == 1.0
    assert result["forced_tokens"] == sum(len(a) + (len(a) < 6) for a in own)
    other = [[(t + 1) % tok.vocab_size for t in a] for a in own]
    assert forced_agreement(model, tok, other, prompts=prompts, max_new_tokens=6)["forced_top1"] < 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std())
    assert forced_agreement(model, tok, own, prompts=prompts, max_new_tokens=6)["forced_nll"] > result["forced_nll"]
    with pytest.raises(ValueError):
        forced_agreement(model, tok, own[:1], prompts=prompts)


def test_answers_of_a_lowered_model_cut_at_any_stop_token(tiny_model):
    """A lowered LM (OnnxLM returns a flat array, TvmLM a (1, L) one) answers through its own
    generate(); the answer is cut at the first of the tokenizer's stop tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    from quipc.eval.chat import answer_ids, prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model[0])
    prompt = prompt_ids(tok, "hi")[0].tolist()
    eos = tok.eos_token_id

    class Lowered:
        def __init__(self, shape):
            self.shape, self.calls = shape, []

        def generate(self, ids, max_new_tokens, eos_token_id=None):
            self.calls.append((np.asarray(ids).tolist(), max_new_tokens, eos_token_id))
            return np.array(prompt + [5, 7, eos, 9], np.int64).reshape(self.shape)

    for shape in ((-1,), (1, -1)):
        lm = Lowered(shape)
        assert answer_ids(lm, tok, "hi", 4) == [5, 7]
        assert lm.calls == [([prompt], 4, eos)]


def test_agreement_ceiling_perturbations(monkeypatch):
    """benchmarks/agreement_ceiling.py: bf16 rounding is exact bfloat16, intN is a per-row symmetric
    RTN grid of at most 2^N - 1 levels with max|w| on it, noiseE has relative row error ~E; an
    unknown kind is refused."""
    from pathlib import Path

    import pytest
    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import agreement_ceiling as C

    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(16, 64, generator=gen)
    w = w0.clone()
    C.perturb_(w, "bf16", gen)
    assert torch.equal(w, w0.to(torch.bfloat16).float()) and not torch.equal(w, w0)
    for bits in (4, 5, 8):
        w = w0.clone()
        C.perturb_(w, f"int{bits}", gen)
        steps = 2 ** (bits - 1) - 1
        scale = w0.abs().amax(dim=1, keepdim=True) / steps
        q = w / scale
        assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= steps + 1e-4
        assert all(len(torch.unique(q[i].round())) <= 2 * steps + 1 for i in range(16))
        assert torch.allclose(w.abs().amax(dim=1), w0.abs().amax(dim=1))
        assert (w - w0).abs().max() <= scale.max() / 2 + 1e-6
    w = w0.clone()
    C.perturb_(w, "noise1e-2", gen)
    rel = ((w - w0).norm(dim=1) / w0.norm(dim=1)).mean()
    assert 0.007 < float(rel) < 0.013
    with pytest.raises(ValueError, match="unknown perturbation"):
        C.perturb_(w, "fp8", gen)
