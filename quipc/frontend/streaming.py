"""A causal LM whose decoder blocks are materialized one at a time.

The model is built on the meta device (accelerate's init_empty_weights: no memory, buffers such
as rotary tables real); everything outside the decoder blocks' linear weights (embeddings,
norms, lm_head, biases) is read at once, the linear weights of block i only while block i is
being worked on, from the checkpoint by name (tensor_sources.py). Peak memory is then about
one block, the calibration activations and the embeddings, whatever the depth. Loaded values
are those `from_pretrained(..., dtype=float32)` gives (checked by tests/test_streaming.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..memory import return_freed_memory
from .hf import _one_line, load_config, load_tokenizer
from .models import ModelSource
from .tensor_sources import GGUFSource, SafetensorsSource
from .trace import find_blocks


class StreamedModel:
    def __init__(self, model: nn.Module, source, dtype: torch.dtype):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self._source, self._dtype = source, dtype
        self._streamed = [self._block_linear_weights(i) for i in range(len(self.blocks))]
        streamed = {n for names in self._streamed for n in names}
        expected = set(model.state_dict())
        tied = set(_tied_names(model))
        missing = sorted(expected - source.names() - tied)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
        for name in sorted(expected - streamed - tied):
            self._set(name, source.get(name))
        model.tie_weights()
        self.loaded: set[int] = set()

    def _block_linear_weights(self, index: int) -> list[str]:
        block = self.blocks[index]
        return [f"{self.prefix}.{index}.{n}.weight" for n, m in block.named_modules() if isinstance(m, nn.Linear)]

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        old = getattr(module, attr)
        if value is None:
            value = torch.empty(old.shape, dtype=old.dtype, device="meta")
        elif tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"{name}: the checkpoint holds shape {tuple(value.shape)}, the model "
                             f"expects {tuple(old.shape)}")
        else:
            value = value.to(self._dtype)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(f"{name}: the weight holds NaN or Inf ({bad} of {value.numel()} values) in "
                                 "the checkpoint; refusing to quantize it")
        if isinstance(old, nn.Parameter):
            module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = value

    def load_block(self, index: int) -> nn.Module:
        """Block `index` with its weights read from the checkpoint (a no-op when loaded)."""
        if index not in self.loaded:
            for name in self._streamed[index]:
                self._set(name, self._source.get(name))
            self.loaded.add(index)
        return self.blocks[index]

    def release_block(self, index: int) -> None:
        """Back to the meta device: the block's linear weights are freed."""
        if index in self.loaded:
            for name in self._streamed[index]:
                self._set(name, None)
            self.loaded.discard(index)
            return_freed_memory()

    @contextmanager
    def fully_loaded(self):
        """The whole model in memory for the duration (data-free calibration generates text
        with it), released afterwards."""
        before = set(self.loaded)
        try:
            for i in range(len(self.blocks)):
                self.load_block(i)
            yield self.model
        finally:
            for i in range(len(self.blocks)):
                if i not in before:
                    self.release_block(i)




def _tied_names(model: nn.Module) -> list[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return list(keys) if isinstance(keys, dict) else list(keys)


def open_streamed(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(StreamedModel, tokenizer) for a resolved source (a safetensors folder or a GGUF file)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        config = load_config(source)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load {source.spec} as a causal LM: {_one_line(e)}") from None
    tokenizer = load_tokenizer(source)
    tensors = GGUFSource(source.folder / source.gguf_file, model) if source.gguf_file \
        else SafetensorsSource(source.folder)
    model.eval()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return StreamedModel(model, tensors, dtype), tokenizer
