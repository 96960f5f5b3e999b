"""Load a causal LM with transformers (fp32 by default) and its tokenizer."""
from __future__ import annotations

import torch

from .models import ModelSource


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(model in eval mode on CPU, tokenizer) for a resolved source."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load {source.spec} as a causal LM: {_one_line(e)}") from None
    tokenizer = load_tokenizer(source)
    model.eval()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model, tokenizer


def load_tokenizer(source: ModelSource):
    """The source's tokenizer, or a ValueError naming the source."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load a tokenizer for {source.spec}: {_one_line(e)}") from None


def _one_line(err: Exception) -> str:
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return " ".join(lines)[:400]
