"""Rebuild a transformers causal LM from an artifact, with quantized linears swapped in."""
from __future__ import annotations

from pathlib import Path

import torch

from . import artifact as art
from .int8_rows import trellis_copy_scope

BACKENDS = ("reference", "kernels")


def _empty_model(manifest: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(manifest["model_config"])
    if _separate_head(manifest):
        cfg["tie_word_embeddings"] = False
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise art.ArtifactError("manifest has no model_type in model_config")
    # generation with the KV cache: artifacts of earlier versions stored the compile's
    # use_cache=False, with which every generate() step recomputed the whole sequence
    cfg["use_cache"] = True
    config = AutoConfig.for_model(model_type, **cfg)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def _module_for(layer, backend: str, device: str, int8_activations: bool = False,
                trellis_as_int8: bool = False):
    if backend == "reference":
        from .modules import QuipLinearRef

        return QuipLinearRef(layer)
    from .kernels import KernelQuipLinear

    return KernelQuipLinear(layer, device=device, int8_activations=int8_activations,
                            trellis_as_int8=trellis_as_int8)


def load_model(folder, device: str = "cpu", backend: str = "reference", allow_incomplete: bool = False,
               int8_activations: bool = False, trellis_as_int8: bool | str = "all"):
    """allow_incomplete: load a compile whose layers are all written but which is not marked
    complete yet (the compiler's fine-tuning stage works on it). int8_activations: backend
    "kernels" on the CPU, the 4-bit GEMVs on int8 activations; trellis_as_int8: the trellis
    layers whose GEMV runs on an 8-bit copy of their rows (int8_rows.trellis_copy_scope; default all
    of them, as the custom-op library and TVM's default build), the others' exact (`kernels.prepare`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    scope = trellis_copy_scope(trellis_as_int8)
    folder = Path(folder)
    manifest = art.read_manifest(folder, allow_incomplete=allow_incomplete)
    layers = art.load_layers(folder, manifest)
    dense = art.load_dense(folder, manifest)
    model = _empty_model(manifest)
    for name, layer in layers.items():
        model.set_submodule(name, _module_for(layer, backend, device, int8_activations, scope == "all"))
    _install_head_and_embedding(model, folder, manifest, backend, device, int8_activations, scope != "none")
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if unexpected:
        raise art.ArtifactError(f"artifact holds tensors the model does not have: {unexpected[:5]}")
    if not _separate_head(manifest):
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


def _separate_head(manifest: dict) -> bool:
    """lm_head and the embedding are stored apart (quantized, or dense in different forms,
    one table at most for a tied model): the model is built untied, and never tied."""
    return bool(manifest.get("head") or manifest.get("embedding"))


def _install_head_and_embedding(model, folder: Path, manifest: dict, backend: str, device: str,
                                int8_activations: bool = False, trellis_as_int8: bool = True) -> list[str]:
    """Swap in the quantized lm_head and embedding the manifest names (artifacts from before
    these existed have neither); returns the names of the modules replaced."""
    from .embedding import EmbeddingTable, QuantEmbedding

    replaced = []
    head = None
    rec = manifest.get("head")
    if rec:
        layers = art.load_block(folder, rec)
        if len(layers) != 1:
            raise art.ArtifactError(f"head record holds {len(layers)} layers, expected 1")
        head = layers[0]
        model.set_submodule(rec["module"], _module_for(head, backend, device, int8_activations, trellis_as_int8))
        replaced.append(rec["module"])
    emb = manifest.get("embedding")
    if emb and emb.get("kind") in ("head", "table"):
        if emb["kind"] == "head":
            if head is None:
                raise art.ArtifactError("the embedding shares the head's codes, but the artifact has no head")
            source = head
        else:
            try:
                source = EmbeddingTable.from_storage(emb, art.load_tensors(folder, emb))
            except (KeyError, ValueError) as e:
                raise art.ArtifactError(f"embedding table is malformed: {e}") from None
        try:
            scale = _embed_scale(model.get_submodule(emb["module"]))
            module = QuantEmbedding(source, backend=backend, scale=scale)
        except ValueError as e:
            raise art.ArtifactError(f"embedding: {e}") from None
        model.set_submodule(emb["module"], module)
        replaced.append(emb["module"])
    elif emb and emb.get("kind") != "dense":
        raise art.ArtifactError(f"unknown embedding kind {emb.get('kind')!r} (written by a newer quipc?)")
    return replaced


def _embed_scale(module) -> float | None:
    """The factor a family's own embedding module applies to its rows (Gemma 3's scaled
    word embedding), which the quantized table must apply too; None for a plain one."""
    scale = getattr(module, "embed_scale", None)
    return None if scale is None else float(scale)


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
