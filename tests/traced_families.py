"""Tiny random models of every family the traced lowering covers, built from transformers
configs in the test (hidden 64, 2 layers, vocab 256), compiled once per test session.

FAMILY_CONFIGS holds what each family needs to show its own features: qwen2 has q/k/v
biases by default, qwen3 and gemma3 q/k norms, gemma2/3 one sliding-window layer (window 8,
shorter than the test prompts) and one global, soft-capping (gemma2) and embedding scaling,
phi3 its fused qkv_proj / gate_up_proj; phi and cohere attention and MLP in parallel, smollm3 a
layer without rotary, olmo2/olmo3/exaone4 post-norms, granite its multipliers, olmo3 and exaone4
a sliding-window layer, arcee and apertus a gateless MLP (ReLU², xIELU).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from tiny import make_tokenizer, write_text

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
SLIDING = dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
FAMILY_CONFIGS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "gemma2": ("gemma2", SLIDING),
    "gemma3": ("gemma3_text", SLIDING),
    "phi3": ("phi3", {}),
    "phi": ("phi", {}),
    "stablelm": ("stablelm", dict(use_qkv_bias=True)),
    "cohere": ("cohere", {}),
    "glm": ("glm", dict(head_dim=16)),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0])),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "granite": ("granite", dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                logits_scaling=4.0)),
    "helium": ("helium", dict(head_dim=16)),
    "exaone4": ("exaone4", dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", dict(head_dim=16)),
    "seed_oss": ("seed_oss", dict(head_dim=16)),
    "arcee": ("arcee", {}),
    "apertus": ("apertus", {}),
}
# Sizes with no Hadamard construction (runtime hadamard.split_order), so QuIP's incoherence
# falls back to Kronecker products of random orthogonal factors on every side of every linear:
# hidden 52 = 4 x 13, intermediate 184 = 8 x 23, k/v width 26 = 2 x 13 (2 heads of 26, one kv head).
KRON_SIZES = dict(hidden_size=52, intermediate_size=184, num_attention_heads=2, num_key_value_heads=1)
PROMPT_LEN, DECODE_STEPS = 12, 8
_ROOT = Path(tempfile.mkdtemp(prefix="quipc-traced-"))
atexit.register(shutil.rmtree, _ROOT, True)


def make_family_model(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """The family's tiny model (FAMILY_CONFIGS, `overrides` on top), saved with the tiny
    tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILY_CONFIGS[family]
    config = AutoConfig.for_model(model_type, **{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init, so outputs depend on them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def family_artifact(family: str, head: bool = False, kron: bool = False, head_format: str = "grid",
                    blocks_format: str = "grid") -> Path:
    """A 2-bit QuIP artifact of the family's tiny model; head=True: e8p blocks with a 4-bit
    lm_head (in `head_format`) whose codes are the embedding too (the CLI's defaults, without
    fine-tuning), its frequent rows at 8 bits (--head-int8-rows 4096); blocks_format (without
    head): the blocks' code format; kron=True: the model in KRON_SIZES."""
    return _compiled(family, bool(head), bool(kron), head_format, blocks_format)


@lru_cache(maxsize=None)
def _compiled(family: str, head: bool, kron: bool = False, head_format: str = "grid",
              blocks_format: str = "grid") -> Path:
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig

    root = _ROOT / (f"{family}-kron" if kron else family)
    folder = root / "hf" if (root / "hf").is_dir() else \
        make_family_model(root / "hf", family, **(KRON_SIZES if kron else {}))
    text = root / "calib.txt" if (root / "calib.txt").is_file() else write_text(root / "calib.txt")
    cfg = QuantConfig(bits=2, format="e8p", head_bits=4, embed_bits="head", head_int8_rows=4096,
                      head_format=head_format) if head else QuantConfig(bits=2, format=blocks_format)
    out = root / (("art-head" + ("" if head_format == "grid" else f"-{head_format}")) if head
                  else "art" + ("" if blocks_format == "grid" else f"-{blocks_format}"))
    compile_model(str(folder), out, cfg, CalibConfig(text=str(text), windows=8, length=32), progress=False)
    return out


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 250, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def torch_reference(artifact: Path, backend: str = "reference"):
    """(prefill logits (L, V), [logits of each greedy decode step], tokens) on the torch path,
    through transformers' own generate and cache, past an end-of-sequence token (as OnnxLM and
    the TVM runtimes are run here)."""
    import quipc_runtime

    model = quipc_runtime.load(artifact, backend=backend)
    ids = prompt()
    with torch.no_grad():
        full = model(ids).logits[0].numpy()
        gen = model.generate(ids, max_new_tokens=DECODE_STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return full, [s[0].numpy() for s in gen.logits], gen.sequences[0].tolist()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
