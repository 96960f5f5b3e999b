"""Which backends can run an artifact's lm_head and embedding (quipc/passes/head.py).

The ONNX export runs them (lm_head as a QuipLinear node, the embedding as a gather +
dequantize, backends/onnx/embedding.py). The TVM backend lowers lm_head and the embedding
from dense tensors only: an artifact whose head or embedding is quantized is refused with
an error that says so, never lowered into a model that computes something else."""
from __future__ import annotations


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


def model_config_for_dense(manifest: dict, dense: dict) -> dict:
    """The model config a dense lowering must follow: a tied model whose artifact stores
    lm_head apart (its embedding at another precision) is lowered untied."""
    cfg = dict(manifest["model_config"])
    if "lm_head.weight" in dense:
        cfg["tie_word_embeddings"] = False
    return cfg
