"""Save a tiny Hugging Face causal LM as a GGUF file, the way llama.cpp lays one out, so that
transformers' GGUF loader gives back the same model: tensors named by gguf's TensorNameMap,
float32 (or Q8_0 for the linears), Llama's q/k rows in llama.cpp's rotary order, Gemma's
norm weights stored with their +1, the config as llama.cpp's metadata keys, and a byte-level
BPE tokenizer over tiny.WORDS (transformers rebuilds it from the GGUF metadata)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tiny import WORDS

# transformers model_type -> (GGUF architecture, general.name)
ARCHS = {"llama": ("llama", "tiny-llama"), "mistral": ("llama", "tiny-mistral"), "qwen2": ("qwen2", "tiny-qwen2"),
         "qwen3": ("qwen3", "tiny-qwen3"), "gemma2": ("gemma2", "tiny-gemma2"),
         "gemma3_text": ("gemma3", "tiny-gemma3"), "phi3": ("phi3", "tiny-phi3")}
SPECIALS = ["<unk>", "<s>", "</s>"]
_CONTROL, _NORMAL, _UNUSED = 3, 1, 5


def bpe_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE whose merges spell each of WORDS whole,
    with and without its leading space ("Ġ"), padded with unused tokens to `size`."""
    tokens, merges = list(SPECIALS), []
    alphabet = sorted({c for w in WORDS for c in w} | {"Ġ", "Ċ"})
    tokens += alphabet
    # every word letter by letter, then (ranked after all of those) the space onto a word
    pairs = [(w[:i], w[i]) for w in WORDS for i in range(1, len(w))] + [("Ġ", w) for w in WORDS]
    for left, right in pairs:
        if left + right not in tokens:
            merges.append(f"{left} {right}")
            tokens.append(left + right)
    assert len(tokens) <= size, (len(tokens), size)
    types = [_CONTROL] * len(SPECIALS) + [_NORMAL] * (len(tokens) - len(SPECIALS))
    pad = [f"<unused{i}>" for i in range(size - len(tokens))]
    return tokens + pad, types + [_UNUSED] * len(pad), merges


def _permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs (per head); transformers'
    LlamaTensorProcessor undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, *, q8_linears: bool = False) -> Path:
    """Write `model` (a transformers causal LM of one of ARCHS' model types) to `path`."""
    import gguf

    c = model.config
    if c.model_type not in ARCHS:
        raise ValueError(f"no GGUF layout for model_type {c.model_type!r}")
    arch, name = ARCHS[c.model_type]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(_rope_theta(c)))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if getattr(c, "sliding_window", None) is not None:
        w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)

    tokens, types, merges = bpe_vocab(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     c.num_hidden_layers)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue                      # llama.cpp writes no output.weight for a tied head
        base, _, suffix = hf_name.rpartition(".")
        gname = names.get_name(base)
        if gname is None:
            raise ValueError(f"{hf_name} has no GGUF name for {arch}")
        t = t.detach().float().numpy()
        if arch == "llama" and gname.endswith(("attn_q", "attn_k")):
            t = _permute_rotary(t, c.num_attention_heads if gname.endswith("attn_q") else c.num_key_value_heads)
        if arch.startswith("gemma") and base.endswith("norm"):
            t = t + np.float32(1)         # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w
        gname = f"{gname}.{suffix}"
        if q8_linears and t.ndim == 2 and gname.startswith("blk."):
            w.add_tensor(gname, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:        # per attention type (gemma3): the global layers' base
        params = params["full_attention"]
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
