"""Tiny random Hugging Face models for fast tests (built in the test, saved to a folder)."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "and", "of", "in", "is", "it"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_tiny_llama(folder: Path, *, hidden: int = 48, layers: int = 2, intermediate: int = 96,
                    vocab: int = 64, seed: int = 0, tied: bool = True) -> Path:
    """A random LlamaForCausalLM (hidden 48 = 12 * 4 exercises non-power-of-2 Hadamards)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so outputs depend on them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    folder = Path(folder)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_text(path: Path, n_words: int = 3000, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[j:j + 20]) for j in range(0, n_words, 20)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def make_tiny_onnx_lm(root: Path) -> tuple[Path, Path, Path, Path]:
    """(root, HF folder, calibration text, fp32 ONNX export) of a tiny Llama, under root."""
    from transformers import AutoModelForCausalLM

    from quipc.backends.onnx import export_hf_model

    folder = make_tiny_llama(root / "hf")
    text = write_text(root / "calib.txt")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return root, folder, text, export_hf_model(model, root / "fp32")
