"""The decoder families the traced lowering is tested on, and what each needs.

The traced path captures whatever transformers' own forward does, so a family is one record
here: its model types, what its forward brings that the hand-written Llama graph lacks (for
the README and the error messages), and checks of config settings the capture cannot keep
(a graph is traced for one control-flow path: settings that switch paths with the sequence
length are refused by name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    features: str
    checks: tuple[Callable[[object], str | None], ...] = field(default=())


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()) and params:
        types = {v.get("rope_type", v.get("type", "default")) for v in params.values()}
        return "+".join(sorted(types))
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def _static_rope(config) -> str | None:
    """Rotary scalings whose tables change with the sequence length in the forward itself."""
    kind = _rope_type(config)
    if "dynamic" in kind:
        return (f"rope scaling {kind!r} recomputes the rotary tables from the sequence length at "
                "run time; a traced graph keeps one set")
    if "longrope" in kind:
        orig = getattr(config, "original_max_position_embeddings", None)
        if orig and int(config.max_position_embeddings) > int(orig):
            return (f"rope scaling 'longrope' switches between its short and long factors at "
                    f"{orig} tokens; a traced graph keeps one (set max_position_embeddings <= {orig})")
    return None


def _no_encoder(config) -> str | None:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not causal LMs with one KV cache"
    return None


COMMON = (_static_rope, _no_encoder)

FAMILIES = (
    Family("llama", ("llama",), "RMSNorm, rotary, grouped-query attention, SwiGLU (SmolLM2, Llama 3.x)", COMMON),
    Family("mistral", ("mistral",), "Llama blocks; optional sliding-window attention", COMMON),
    Family("qwen2", ("qwen2",), "biases on q/k/v", COMMON),
    Family("qwen3", ("qwen3",), "RMSNorm on q and k per head (q/k norms)", COMMON),
    Family("gemma2", ("gemma2",), "sliding-window and global layers, attention and final logit "
           "soft-capping, embedding scaling, GeGLU, pre/post norms", COMMON),
    Family("gemma3", ("gemma3_text",), "sliding-window and global layers (own rotary bases), "
           "q/k norms, scaled embedding, GeGLU", COMMON),
    Family("phi3", ("phi3",), "fused qkv_proj and gate_up_proj (one quantized linear each)", COMMON),
    Family("phi", ("phi",), "LayerNorm with bias, attention and MLP in parallel from one norm, partial rotary, "
           "GELU MLP, biases everywhere (Phi-2)", COMMON),
    Family("stablelm", ("stablelm",), "LayerNorm, partial rotary, q/k/v biases", COMMON),
    Family("cohere", ("cohere",), "LayerNorm without bias, attention and MLP in parallel, interleaved rotary, "
           "logit scaling (Command R)", COMMON),
    Family("glm", ("glm",), "partial interleaved rotary, fused gate_up_proj, q/k/v biases (GLM-4)", COMMON),
    Family("smollm3", ("smollm3",), "Llama blocks with rotary switched off in some layers (NoPE)", COMMON),
    Family("olmo2", ("olmo2",), "norms after attention and MLP (post-norm), RMSNorm on the whole q and k "
           "projections", COMMON),
    Family("olmo3", ("olmo3",), "OLMo 2 blocks with sliding-window and global layers", COMMON),
    Family("granite", ("granite",), "embedding, residual and attention multipliers, logits divided by a "
           "scale (IBM Granite 3)", COMMON),
    Family("helium", ("helium",), "Llama blocks with their own head size (Kyutai Helium)", COMMON),
    Family("exaone4", ("exaone4",), "post-norms, q/k norms, sliding-window and global layers (EXAONE 4)", COMMON),
    Family("hunyuan_v1_dense", ("hunyuan_v1_dense",), "q/k norms after rotary (Hunyuan dense)", COMMON),
    Family("seed_oss", ("seed_oss",), "q/k/v biases, own head size (Seed-OSS)", COMMON),
    Family("arcee", ("arcee",), "ReLU-squared MLP without a gate (Arcee AFM)", COMMON),
    Family("apertus", ("apertus",), "xIELU MLP without a gate, q/k norms (Swiss AI Apertus)", COMMON),
)
BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_for(config) -> Family:
    """The family of a transformers config, after its checks; a clear error otherwise."""
    model_type = getattr(config, "model_type", None)
    fam = BY_TYPE.get(model_type)
    if fam is None:
        raise ValueError(f"the traced lowering has no family for model_type {model_type!r}; it covers "
                         f"{', '.join(sorted(BY_TYPE))} (quipc/backends/traced/families.py)")
    for check in fam.checks:
        why = check(config)
        if why:
            raise ValueError(f"{fam.name}: the traced lowering cannot export this model: {why}")
    return fam
