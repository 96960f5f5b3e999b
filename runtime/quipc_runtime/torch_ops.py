"""quipc's quantized layers as registered torch ops, so that `torch.export` captures each one
as a single node instead of tracing its arithmetic.

    torch.ops.quipc.quip_linear(x, key, out_features) -> y      (..., out_features)
    torch.ops.quipc.quip_embedding(ids, key, dim) -> rows       (..., dim)

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
