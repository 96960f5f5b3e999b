"""An artifact's quantized lm_head and embedding (quipc/passes/head.py) in the lowering backends.

ONNX runs both as they are stored: lm_head as a QuipLinear node, the embedding as a gather of
code rows + dequantize (backends/onnx/embedding.py). TVM runs the quantized lm_head as one more
QuIP linear, and the embedding from a table dequantized at build time (fp32 in its params: the
same values, not the compact form). An artifact naming something neither knows is refused with
an error that says what, never lowered into a model that computes something else.
"""
from __future__ import annotations

import numpy as np


def quantized_parts(manifest: dict) -> list[str]:
    parts = []
    if manifest.get("head"):
        parts.append(f"a {manifest['head']['layers'][0]['bits']}-bit quantized lm_head")
    emb = manifest.get("embedding") or {}
    if emb.get("kind") == "head":
        parts.append("an embedding stored as the lm_head's codes")
    elif emb.get("kind") == "table":
        parts.append(f"a {emb['bits']}-bit embedding table")
    elif emb.get("kind") not in (None, "dense"):
        parts.append(f"an embedding of unknown kind {emb.get('kind')!r}")
    return parts


def require_dense_head(manifest: dict, backend: str) -> None:
    parts = quantized_parts(manifest)
    if parts:
        raise ValueError(f"the {backend} backend does not run {' and '.join(parts)} yet; recompile with "
                         "--head-bits 32 --embed-bits 32 (or --embed-bits 16) for it, or run this artifact "
                         "on the torch path (quipc.load, backend='reference' or 'kernels')")


def head_and_dense_embedding(artifact, manifest: dict, layers: dict, dense: dict,
                             head_decodes=lambda head: False) -> bool:
    """Add the quantized lm_head to `layers` (under its module name) and a quantized embedding,
    dequantized to float32, to `dense` (in place). An embedding that shares the head's codes is
    left out where `head_decodes(head)` says the lowering decodes it from the head's own
    arrays; returns whether it did."""
    import torch

    from quipc_runtime import artifact as art
    from quipc_runtime.embedding import EmbeddingTable, head_rows

    head = None
    if manifest.get("head"):
        rec = manifest["head"]
        if rec.get("module") != "lm_head":
            raise ValueError(f"unexpected lm_head module {rec.get('module')!r}")
        (head,) = art.load_block(artifact, rec)
        layers["lm_head"] = head
    emb = manifest.get("embedding") or {}
    kind = emb.get("kind")
    if kind in (None, "dense"):
        return False
    if emb.get("module") != "model.embed_tokens":
        raise ValueError(f"unexpected embedding module {emb.get('module')!r}")
    if kind == "head":
        if head is None:
            raise ValueError("the embedding shares the head's codes, but the artifact has no head")
        if head_decodes(head):
            return True
        table = head_rows(head, np.arange(head.out_features))
    elif kind == "table":
        table = EmbeddingTable.from_storage(emb, art.load_tensors(artifact, emb)).dequantize()
    else:
        require_dense_head(manifest, "TVM")
    dense["model.embed_tokens.weight"] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
    return False


def model_config_for_dense(manifest: dict, dense: dict, layers: dict | None = None) -> dict:
    """The model config a lowering must follow: a tied model whose artifact stores lm_head
    apart (quantized, or dense beside an embedding of another precision) is lowered untied."""
    cfg = dict(manifest["model_config"])
    if "lm_head.weight" in dense or (layers is not None and "lm_head" in layers):
        cfg["tie_word_embeddings"] = False
    return cfg
