"""quipc's quantized layers as registered torch ops, so that `torch.export` captures each one
as a single node instead of tracing its arithmetic.

    torch.ops.quipc.quip_linear(x, key, out_features) -> y      (..., out_features)
    torch.ops.quipc.quip_embedding(ids, key, dim) -> rows       (..., dim)
    torch.ops.quipc.attention(q, k, v, mask, scaling, softcap) -> (batch, seq, heads, head_dim)
    torch.ops.quipc.kv_write(cache, new, span) -> cache's first len(span) positions, new last

`key` names the module that computes the op (its name in the model, behind a tag of the model
it belongs to: "<tag>/<name>"); the eager kernels look the module up in a registry, the fake
kernels only give shapes, and a backend's translation reads the layer by its name
(`layer_name(key)`). `with_ops(model)` swaps every quantized linear / embedding of a loaded
artifact (QuipLinearRef, KernelQuipLinear, QuantEmbedding) for a module calling the op; the
model computes exactly what it did before.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

NAMESPACE = "quipc"
_MODULES: "weakref.WeakValueDictionary[str, nn.Module]" = weakref.WeakValueDictionary()
_TAGS = itertools.count()


def module_for(key: str) -> nn.Module:
    """The module computing the op registered under `key` (its eager kernel)."""
    module = _MODULES.get(key)
    if module is None:
        raise KeyError(f"no quipc module is registered under {key!r} (its model was freed?)")
    return module


def layer_name(key: str) -> str:
    """The layer's name in the model (the key without its model tag)."""
    return key.split("/", 1)[1] if "/" in key else key


@torch.library.custom_op(f"{NAMESPACE}::quip_linear", mutates_args=())
def quip_linear(x: torch.Tensor, key: str, out_features: int) -> torch.Tensor:
    return module_for(key)(x).clone()


@quip_linear.register_fake
def _quip_linear_fake(x: torch.Tensor, key: str, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op(f"{NAMESPACE}::quip_embedding", mutates_args=())
def quip_embedding(ids: torch.Tensor, key: str, dim: int) -> torch.Tensor:
    return module_for(key).lookup(ids).clone()


@quip_embedding.register_fake
def _quip_embedding_fake(ids: torch.Tensor, key: str, dim: int) -> torch.Tensor:
    return torch.empty((*ids.shape, dim), dtype=torch.float32, device=ids.device)


@torch.library.custom_op(f"{NAMESPACE}::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scaling: float, softcap: float) -> torch.Tensor:
    """softmax(soft-cap(q k^T * scaling) + mask) v over grouped-query heads, the arithmetic of
    transformers' eager attention: q (B, H, S, D), k / v (B, KV, L, D) with KV dividing H (query
    head h reads kv head h // (H / KV)), mask additive and broadcastable to (B, H, S, L) or None,
    softcap 0 for none -> (B, S, H, D)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, mask, scaling, softcap):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


@torch.library.custom_op(f"{NAMESPACE}::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, new: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """A KV cache of fixed capacity with `new` written at its end: cache (B, KV, C, D), new
    (B, KV, T, D), span any tensor of S = past + T elements (only its length is read) ->
    (B, KV, S, D): positions [0, S - T) of `cache`, then `new`. Functional here (the cache is
    not written); the traced TVM build lowers it to a write into the cache in place, so that a
    decode step copies one position per layer and kind instead of the whole cache."""
    past = span.shape[0] - new.shape[2]
    if past < 0 or span.shape[0] > cache.shape[2]:
        raise ValueError(f"kv_write: {new.shape[2]} new positions ending at {span.shape[0]} do not fit "
                         f"a cache of {cache.shape[2]}")
    return torch.cat([cache[:, :, :past], new], dim=2)


@kv_write.register_fake
def _kv_write_fake(cache, new, span):
    torch._check(span.shape[0] >= new.shape[2])
    torch._check(span.shape[0] <= cache.shape[2])
    return cache.new_empty((cache.shape[0], cache.shape[1], span.shape[0], cache.shape[3]))


def attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        softcap=None, **kwargs):
    """transformers' attention interface ("quipc", registered by `register_attention`): the
    family's query / key / value, mask and soft-capping handed to torch.ops.quipc.attention."""
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by quipc's attention op")
    if dropout and module.training:
        raise ValueError("quipc's attention op runs inference only (dropout > 0 in training mode)")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} kv heads")
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    out = torch.ops.quipc.attention(query, key, value, mask, scale, float(softcap or 0.0))
    return out, None


ATTENTION = "quipc"


def register_attention() -> str:
    """Register `attention_interface` (and transformers' eager mask) under the name "quipc", for
    `model.set_attn_implementation("quipc")`; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, attention_interface)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    return ATTENTION


class QuipOpLinear(nn.Module):
    """Calls torch.ops.quipc.quip_linear; the wrapped module (kept in `inner`, outside the
    module tree so its buffers are not captured as constants) computes it eagerly."""

    def __init__(self, key: str, inner: nn.Module):
        super().__init__()
        self.key, self.out_features = key, int(inner.out_features)
        self.in_features = int(inner.in_features)
        self.__dict__["inner"] = inner
        _MODULES[key] = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quipc.quip_linear(x, self.key, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.key}, in_features={self.in_features}, out_features={self.out_features}"


class QuipOpEmbedding(nn.Module):
    """Calls torch.ops.quipc.quip_embedding (see QuipOpLinear)."""

    def __init__(self, key: str, inner: nn.Module):
        super().__init__()
        self.key, self.embedding_dim = key, int(inner.embedding_dim)
        self.num_embeddings = int(inner.num_embeddings)
        self.__dict__["inner"] = inner
        _MODULES[key] = inner
        # the stored rows are the op; a family's embedding scale stays a plain multiply
        self.register_buffer("scale", getattr(inner, "scale", None), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.quipc.quip_embedding(ids, self.key, self.embedding_dim)
        return rows if self.scale is None else rows * self.scale

    def extra_repr(self) -> str:
        return f"{self.key}, {self.num_embeddings}, {self.embedding_dim}"


def _kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name in ("QuipLinearRef", "KernelQuipLinear"):
        return "linear"
    if name == "QuantEmbedding":
        return "embedding"
    return None


def with_ops(model: nn.Module) -> dict[str, str]:
    """Swap, in place, every quantized linear / embedding of `model` for the module calling
    its op; returns {layer name: kind}. The originals stay alive as long as the model."""
    tag = f"m{next(_TAGS)}"
    swapped, keep = {}, []
    for name, module in list(model.named_modules()):
        kind = _kind(module)
        if kind is None:
            continue
        op = (QuipOpLinear if kind == "linear" else QuipOpEmbedding)(f"{tag}/{name}", module)
        model.set_submodule(name, op)
        keep.append(module)
        swapped[name] = kind
    model.__dict__.setdefault("_quipc_op_modules", []).extend(keep)  # owned by the model
    return swapped
