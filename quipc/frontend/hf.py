"""Load a causal LM with transformers (fp32 by default) and its tokenizer."""
from __future__ import annotations

import torch

from .models import ModelSource


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(model in eval mode on CPU, tokenizer) for a resolved source."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        kwargs = {"gguf_file": source.gguf_file, "config": load_config(source)} if source.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load {source.spec} as a causal LM: {_one_line(e)}") from None
    tokenizer = load_tokenizer(source)
    model.eval()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model, tokenizer


def load_config(source: ModelSource):
    """The source's transformers config (a GGUF's completed by `_complete_gguf_config`);
    raises what AutoConfig raises (callers name the source)."""
    from transformers import AutoConfig

    from . import gguf_file

    if not source.gguf_file:
        return AutoConfig.from_pretrained(source.folder)
    config = gguf_file.config(source.folder, source.gguf_file)
    _complete_gguf_config(config, source.folder / source.gguf_file)
    return config


def _complete_gguf_config(config, path) -> None:
    """What transformers' GGUF metadata map leaves out: the head width. llama.cpp writes it as
    `<arch>.attention.key_length`, which transformers reads for gemma2/3 (and llama's as its
    rope dimension) but not for qwen3, whose config then keeps Qwen3's default head_dim (128)
    whatever the file holds, and its q/k/v/o weights do not fit."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import read_field

    from . import gguf_file

    reader = gguf_file.reader(path)
    arch = read_field(reader, "general.architecture")[0]
    key_length = read_field(reader, f"{arch}.attention.key_length")
    if key_length and "attention.key_length" not in GGUF_CONFIG_MAPPING.get(arch, {}) \
            and getattr(config, "head_dim", None) is not None:
        config.head_dim = int(key_length[0])


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
