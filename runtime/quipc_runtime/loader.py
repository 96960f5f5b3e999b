"""Rebuild a transformers causal LM from an artifact, with quantized linears swapped in."""
from __future__ import annotations

from pathlib import Path

import torch

from . import artifact as art

BACKENDS = ("reference", "kernels")


def _empty_model(manifest: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(manifest["model_config"])
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise art.ArtifactError("manifest has no model_type in model_config")
    config = AutoConfig.for_model(model_type, **cfg)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def _module_for(layer, backend: str, device: str):
    if backend == "reference":
        from .modules import QuipLinearRef

        return QuipLinearRef(layer)
    from .kernels import KernelQuipLinear

    return KernelQuipLinear(layer, device=device)


def load_model(folder, device: str = "cpu", backend: str = "reference"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    folder = Path(folder)
    manifest = art.read_manifest(folder)
    layers = art.load_layers(folder, manifest)
    dense = art.load_dense(folder, manifest)
    model = _empty_model(manifest)
    for name, layer in layers.items():
        model.set_submodule(name, _module_for(layer, backend, device))
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if unexpected:
        raise art.ArtifactError(f"artifact holds tensors the model does not have: {unexpected[:5]}")
    model.tie_weights()
    tied = {k for k in missing if _is_tied(model, k, dense)}
    still = [k for k in missing if k not in tied]
    if still:
        raise art.ArtifactError(f"artifact lacks tensors the model needs: {still[:5]}")
    model.eval()
    model.quipc_manifest = manifest
    if backend == "kernels" and torch.device(device).type == "cpu":
        from .kernels import hand_threads_to_kernels

        hand_threads_to_kernels(model)
    return model.to(device)


def _is_tied(model, key: str, dense: dict) -> bool:
    """A missing key is fine when it is the same tensor as one that was loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(params.get(k) is target for k in dense)


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    manifest = art.read_manifest(folder, allow_incomplete=True)
    rel = manifest.get("tokenizer")
    if not rel:
        raise art.ArtifactError(f"{folder} stores no tokenizer")
    return AutoTokenizer.from_pretrained(art.safe_path(Path(folder), rel))
