"""Capture an artifact's transformers model, KV cache included, with `torch.export`.

The model is the artifact loaded on the torch path (`quipc_runtime.load`) with each quantized
linear / embedding swapped for a module calling its registered op (quipc_runtime.torch_ops),
so every one of them is ONE node of the captured graph. `CachedLM` is the one function that
serves prefill and decode, the interface of the hand-written graphs:

    CachedLM(input_ids (batch, seq), past (2 * layers tensors: key, value of each layer,
             (batch, kv_heads, past_seq, head_dim); past_seq = 0 for prefill))
        -> logits (batch, seq, vocab), present (the same 2 * layers tensors, past_seq + seq)

Positions are past_seq .. past_seq + seq - 1 (no padding). The cache is a plain
transformers DynamicCache rebuilt from `past` (no sliding-window cropping: sliding layers see
their window through the attention mask, so every layer's cache holds every position).

`CapacityCachedLM` (`capture(cache="capacity")`, the traced TVM build's) takes the cache at a
fixed capacity instead, which the backend updates in place:

    CapacityCachedLM(input_ids (batch, seq), span (S,) (any values: its length S = past + seq
                     is the attended length), caches (2 * layers tensors (batch, kv_heads, C, head_dim))
                     [, last (1,) int64: the row whose logits a last_only capture returns])
        -> logits, present (each layer's torch.ops.quipc.kv_write: (batch, kv_heads, S, head_dim))

With `row_multiple` R > 1 input_ids comes as (batch, tiles, R), seq = tiles * R: the backend
pads prompts at the end to a multiple of R (causal attention keeps the padding out of the real
rows; its cache positions are overwritten by the next call), and its kernels know the row
count's factor (an input of shape (batch, R * tiles) would not give the backend `tiles` itself).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .families import Family, family_for


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]


class CachedLM(nn.Module):
    """last_only: logits of the last position only (batch, 1, vocab): a prompt's prefill, which
    needs no other row's logits, skips the lm_head on the rest (transformers' logits_to_keep)."""

    def __init__(self, model: nn.Module, layers: int, last_only: bool = False):
        super().__init__()
        self.model, self.layers, self.last_only = model, layers, last_only

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]):
        for tensor in past[1:]:   # one past length for every layer (one symbol in the program)
            torch._check(tensor.shape[2] == past[0].shape[2])
        cache = _cache_of(past, self.layers)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device) + past[0].shape[2]
        kwargs = {_cache_kwarg(self.model): cache}
        if self.last_only:   # the last row by index, not by slice: a slice of a dynamic length
            # has a length Relax cannot prove to be 1
            kwargs["logits_to_keep"] = torch.full((1,), input_ids.shape[1] - 1, dtype=torch.long)
        out = self.model(input_ids=input_ids, position_ids=pos[None], cache_position=pos, use_cache=True,
                         **kwargs)
        present = []
        for i in range(self.layers):
            present += [cache.layers[i].keys, cache.layers[i].values]
        return out.logits, present


class CapacityCachedLM(nn.Module):
    """CachedLM over a cache of fixed capacity: positions S - seq .. S - 1 are written (by the
    kv_write op, in place in the TVM build) and attended with the S - seq before them."""

    def __init__(self, model: nn.Module, layers: int, last_only: bool = False):
        super().__init__()
        self.model, self.layers, self.last_only = model, layers, last_only

    def forward(self, input_ids: torch.Tensor, span: torch.Tensor, caches: list[torch.Tensor],
                last: torch.Tensor | None = None):
        if input_ids.dim() == 3:   # (batch, tiles, row_multiple)
            input_ids = input_ids.reshape(input_ids.shape[0], input_ids.shape[1] * input_ids.shape[2])
        seq, total = input_ids.shape[1], span.shape[0]
        torch._check(total >= seq)
        for tensor in caches:   # one capacity for every layer, at least the attended span
            torch._check(tensor.shape[2] == caches[0].shape[2])
            torch._check(tensor.shape[2] >= total)
        cache = _capacity_cache(caches, span, total - seq)
        pos = torch.arange(seq, device=input_ids.device) + (total - seq)
        kwargs = {_cache_kwarg(self.model): cache}
        if self.last_only:   # the last real row: prompts may be padded
            kwargs["logits_to_keep"] = last
        out = self.model(input_ids=input_ids, position_ids=pos[None], cache_position=pos, use_cache=True,
                         **kwargs)
        present = []
        for layer in cache.layers:
            if not layer.written:
                raise ValueError(f"{type(self.model).__name__}: a layer's attention did not update its cache "
                                 "(shared or skipped layers are not supported by the capacity cache)")
            present += [layer.keys, layer.values]
        return out.logits, present


def _capacity_cache(caches: list[torch.Tensor], span: torch.Tensor, past):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class CapacityLayer(DynamicLayer):
        """A layer whose update is torch.ops.quipc.kv_write into its fixed-capacity buffers."""

        def __init__(self, keys, values):
            super().__init__()
            self.buffers, self.length, self.written = (keys, values), past, False
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys = torch.ops.quipc.kv_write(self.buffers[0], key_states, span)
            self.values = torch.ops.quipc.kv_write(self.buffers[1], value_states, span)
            self.length, self.written = span.shape[0], True
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    cache = DynamicCache()
    cache.layers = [CapacityLayer(caches[2 * i], caches[2 * i + 1]) for i in range(len(caches) // 2)]
    return cache


def _cache_of(past: list[torch.Tensor], layers: int):
    """A DynamicCache holding `past` (its layers set directly: DynamicLayer.update would concatenate
    onto an empty 1-D tensor, which Relax's importer refuses)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for i in range(layers):
        layer = DynamicLayer()
        layer.lazy_initialization(past[2 * i], past[2 * i + 1])
        layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        cache.layers.append(layer)
    return cache


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5 names the cache argument `cache` (`past_key_values` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    family: Family
    config: object
    manifest: dict
    cache: CacheLayout
    example: tuple
    swapped: dict          # layer name -> "linear" | "embedding"
    seconds: float


ATTENTIONS = ("eager", "op")
CACHES = ("concat", "capacity")


def load_traceable(artifact: Path, attention: str = "eager"):
    """(model with op modules, manifest, {layer name: kind}). attention: "eager" traces
    transformers' eager attention (its matmuls, repeated kv heads and softmax as separate
    nodes); "op" makes each layer's attention one torch.ops.quipc.attention node (the same
    arithmetic, with the family's mask and soft-capping as its inputs)."""
    import quipc_runtime
    from quipc_runtime.torch_ops import register_attention, with_ops

    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    model = quipc_runtime.load(artifact, backend="reference")
    family_for(model.config)
    # eager: soft-capping and every mask variant live there; the op takes the same inputs
    model.set_attn_implementation("eager" if attention == "eager" else register_attention())
    swapped = with_ops(model)
    if not any(kind == "linear" for kind in swapped.values()):
        raise ValueError(f"{artifact} holds no quantized linear the traced lowering could place")
    return model, model.quipc_manifest, swapped


def cache_layout(model: nn.Module) -> CacheLayout:
    """Per-layer kv heads and head dims, read from one short run of the model."""
    with torch.no_grad():
        out = model(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True)
    layers = _returned_cache(out).layers
    if not layers or any(getattr(la, "keys", None) is None for la in layers):
        raise ValueError(f"{model.config.model_type}: the model's cache does not hold keys and values "
                         "per layer, which the traced lowering feeds back")
    return CacheLayout(len(layers), tuple(int(la.keys.shape[1]) for la in layers),
                       tuple(int(la.keys.shape[3]) for la in layers))


def example_inputs(layout: CacheLayout, vocab: int, batch: int = 2, seq: int = 5, past: int = 3) -> tuple:
    """Inputs for the capture (dynamic sizes above 1, so that none is specialized)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    kv = [torch.randn(batch, h, past, d, generator=g)
          for h, d in zip(layout.kv_heads, layout.head_dims) for _ in range(2)]
    return ids, kv


def capacity_example(layout: CacheLayout, vocab: int, batch: int = 2, seq: int = 5, past: int = 3,
                     last_only: bool = False) -> tuple:
    """Inputs for the capacity-cache capture (capacity past + seq + 4)."""
    ids, kv = example_inputs(layout, vocab, batch, seq, past + seq + 4)
    span = torch.zeros(past + seq, dtype=torch.long)
    return (ids, span, kv) + ((torch.full((1,), seq - 2, dtype=torch.long),) if last_only else ())


def capacity_shapes(layout: CacheLayout, batch: int | None, seq: int | None, last_only: bool = False,
                    row_multiple: int = 1) -> tuple:
    """Dims of (input_ids, span, caches[, last]): batch and seq dynamic unless given (with
    row_multiple > 1 input_ids is (batch, tiles, row_multiple): tiles dynamic), span and capacity
    always."""
    b = torch.export.Dim("batch") if batch is None else None
    t = None if seq is not None else torch.export.Dim("seq" if row_multiple == 1 else "row_tiles")
    ids = {k: d for k, d in ((0, b), (1, t)) if d is not None}
    # export assumes a dynamic size >= 2, so 2 tiles of rows at least (the backend runs 1 as well)
    least = 2 * row_multiple if seq is None else 2
    cap = torch.export.Dim("capacity", min=least)
    return (ids or None, {0: torch.export.Dim("span", min=least)},
            [{**({0: b} if b is not None else {}), 2: cap} for _ in range(2 * layout.layers)]) + \
        ((None,) if last_only else ())


def dynamic_shapes(layout: CacheLayout, batch: int | None, seq: int | None) -> tuple:
    """Dims of (input_ids, past): batch and seq dynamic unless given, past_seq always."""
    b = torch.export.Dim("batch") if batch is None else None
    t = torch.export.Dim("seq") if seq is None else None
    # a static seq (decode) gives guards on past_seq the solver cannot prove: let export decide
    past = torch.export.Dim("past_seq", min=0) if seq is None else torch.export.Dim.AUTO
    ids = {k: d for k, d in ((0, b), (1, t)) if d is not None}
    return ids or None, [{**({0: b} if b is not None else {}), 2: past} for _ in range(2 * layout.layers)]


@dataclass
class Traceable:
    """An artifact's model ready for capture (loaded once, captured as often as needed)."""
    model: nn.Module
    manifest: dict
    swapped: dict          # layer name -> "linear" | "embedding"
    family: Family
    layout: CacheLayout

    @staticmethod
    def load(artifact: Path, attention: str = "eager") -> "Traceable":
        model, manifest, swapped = load_traceable(Path(artifact), attention)
        return Traceable(model, manifest, swapped, family_for(model.config), cache_layout(model))

    def capture(self, batch: int | None = None, seq: int | None = None, last_only: bool = False,
                cache: str = "concat", row_multiple: int = 1) -> Captured:
        """torch.export of CachedLM (cache="concat") or CapacityCachedLM (cache="capacity");
        batch / seq: static sizes (None: dynamic); last_only: the last position's logits only
        (of the row `last`, an input, with the capacity cache); row_multiple: a dynamic seq is
        a multiple of it (capacity cache only)."""
        if row_multiple != 1 and cache != "capacity":
            raise ValueError("row_multiple needs the capacity cache (padded prompts)")
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        t0 = time.time()
        vocab = int(self.model.config.vocab_size)
        if cache == "concat":
            wrapper = CachedLM(self.model, self.layout.layers, last_only).eval()
            example = example_inputs(self.layout, vocab, batch=batch or 2, seq=seq or 5)
            shapes = dynamic_shapes(self.layout, batch, seq)
        else:
            wrapper = CapacityCachedLM(self.model, self.layout.layers, last_only).eval()
            rows = seq or (5 if row_multiple == 1 else 2 * row_multiple)   # a dynamic size above 1
            example = capacity_example(self.layout, vocab, batch=batch or 2, seq=rows, last_only=last_only)
            if row_multiple != 1:
                example = (example[0].reshape(example[0].shape[0], -1, row_multiple),) + example[1:]
            shapes = capacity_shapes(self.layout, batch, seq, last_only, row_multiple)
        try:
            with torch.no_grad():
                ep = torch.export.export(wrapper, example, strict=False, dynamic_shapes=shapes)
        except Exception as e:
            raise ValueError(f"{self.family.name}: torch.export could not capture the model with its KV cache: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        return Captured(ep, self.family, self.model.config, self.manifest, self.layout, example, self.swapped,
                        time.time() - t0)


def capture(artifact: Path, attention: str = "eager") -> Captured:
    """torch.export of CachedLM over the artifact's model (dynamic batch, seq and past_seq)."""
    return Traceable.load(artifact, attention).capture()
