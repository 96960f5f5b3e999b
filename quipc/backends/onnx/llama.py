"""The fp32 reference ONNX graph of a transformers Llama model, written node by node
(`export.export_hf_model`: the fp32 baseline of the benchmarks and the input of the ONNX
frontend's tests). quipc artifacts of every family, Llama included, are lowered to ONNX by the
traced graph (traced.py); this graph lowered them until stop 41, when the traced file matched
its decode time (paired 1.002x, docs/families.md).

One graph serves prefill and decode:
    inputs : input_ids (batch, seq) int64,
             past_key_values.{i}.key / .value (batch, kv_heads, past_seq, head_dim) float32
             (past_seq = 0 for prefill)
    outputs: logits (batch, seq, vocab) float32, present.{i}.key / .value (past_seq + seq)
Positions are past_seq .. past_seq + seq - 1 (no padding: batch rows are equally long).
Linear layers are emitted by a callback (dense_linear: a MatMul with the transposed weight).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from onnx import TensorProto

from .builder import Builder
from .fusable import rotary_sign, rotary_swap

SUPPORTED = ("llama",)
FLOAT = TensorProto.FLOAT

# linear(builder, x, full_name, out_name=None) -> output name
LinearFn = Callable[[Builder, str, str], str]


def rotary_tables(config, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (max_positions, head_dim) from transformers' own rotary module."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(config)
    pos = torch.arange(max_positions)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].float().numpy(), sin[0].float().numpy()


def dense_linear(dense: dict[str, np.ndarray]) -> LinearFn:
    """fp32 MatMul with the transposed weight as an initializer (+ bias)."""
    def fn(b: Builder, x: str, name: str, out_name: str | None = None) -> str:
        w = b.initializer(f"{name}.weight_t", np.ascontiguousarray(dense[f"{name}.weight"].T.astype(np.float32)))
        bias = dense.get(f"{name}.bias")
        if bias is None:
            return b.op("MatMul", x, w, out_name=out_name)
        y = b.op("MatMul", x, w)
        return b.op("Add", y, b.initializer(f"{name}.bias", bias.astype(np.float32)), out_name=out_name)
    return fn


def _rms_norm(b: Builder, x: str, weight: str, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, written as the pattern onnxruntime's optimizer fuses
    into one SimplifiedLayerNormalization node (Pow 2, ReduceMean, Add, Sqrt, Div, Mul)."""
    var = b.op("ReduceMean", b.op("Pow", x, b.const(np.float32(2.0))), b.ints([-1]), keepdims=1)
    return b.op("Mul", b.op("Div", x, b.op("Sqrt", b.op("Add", var, b.const(np.float32(eps))))), weight)


def _rotate(b: Builder, x: str, cos: str, signed_sin: str, swap: str) -> str:
    """x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1): the halves swapped by one Gather
    and the sign carried by the table (signed_sin = (-sin1, sin2)), 4 nodes instead of 6."""
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", b.op("Gather", x, swap, axis=-1), signed_sin))


def build_llama(config, dense: dict[str, np.ndarray], linear: LinearFn, b: Builder,
                max_positions: int | None = None) -> tuple[list, list]:
    """Add the whole model to b; returns (graph inputs, graph outputs) value infos."""
    from onnx import helper

    if config.model_type not in SUPPORTED:
        raise ValueError(f"ONNX export supports {SUPPORTED} models, not {config.model_type!r}")
    hidden = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    rep = heads // kv_heads
    n_layers = config.num_hidden_layers
    eps = float(config.rms_norm_eps)
    max_positions = max_positions or int(config.max_position_embeddings)
    cos_t, sin_t = rotary_tables(config, max_positions)
    half = head_dim // 2
    cos_tab = b.initializer("rotary.cos", cos_t)
    sin_tab = b.initializer("rotary.signed_sin", (sin_t * rotary_sign(half)).astype(np.float32))
    swap = b.initializer("rotary.swap", rotary_swap(half))
    embed = b.initializer("model.embed_tokens.weight", dense["model.embed_tokens.weight"].astype(np.float32))

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch", "seq", config.vocab_size])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", FLOAT,
                                                        ["batch", kv_heads, "past_seq", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", FLOAT,
                                                         ["batch", kv_heads, "total_seq", head_dim]))

    ids_shape = b.op("Shape", "input_ids")
    batch = b.op("Slice", ids_shape, b.ints([0]), b.ints([1]))
    seq = b.op("Slice", ids_shape, b.ints([1]), b.ints([2]))
    past = b.op("Slice", b.op("Shape", "past_key_values.0.key"), b.ints([2]), b.ints([3]))
    past_s = b.op("Squeeze", past, b.ints([0]))
    total_s = b.op("Add", past_s, b.op("Squeeze", seq, b.ints([0])))
    one = b.const(np.int64(1))
    qpos = b.op("Range", past_s, total_s, one)                      # (T,)
    kpos = b.op("Range", b.const(np.int64(0)), total_s, one)        # (S,)
    future = b.op("Less", b.op("Unsqueeze", qpos, b.ints([1])), b.op("Unsqueeze", kpos, b.ints([0])))  # (T, S)
    neg = b.const(np.float32(np.finfo(np.float32).min))
    cos = b.op("Unsqueeze", b.op("Gather", cos_tab, qpos, axis=0), b.ints([0, 2]))   # (1, T, 1, D)
    sin = b.op("Unsqueeze", b.op("Gather", sin_tab, qpos, axis=0), b.ints([0, 2]))
    scaling = b.const(np.float32(head_dim ** -0.5))   # onnxruntime fuses it into the scores' MatMul

    x = b.op("Gather", embed, "input_ids", axis=0)                  # (B, T, hidden)
    bt_shape = b.op("Concat", batch, seq, axis=0)
    heads_shape = lambda h: b.op("Concat", bt_shape, b.ints([h, head_dim]), axis=0)  # noqa: E731
    for i in range(n_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(b, x, b.initializer(f"{p}.input_layernorm.weight",
                                          dense[f"{p}.input_layernorm.weight"].astype(np.float32)), eps)
        q, k, v = (linear(b, h, f"{p}.self_attn.{n}_proj") for n in "qkv")
        # rotated as (B, T, heads, D), then (B, heads, T, D)
        q = b.op("Transpose", _rotate(b, b.op("Reshape", q, heads_shape(heads)), cos, sin, swap), perm=[0, 2, 1, 3])
        k = b.op("Transpose", _rotate(b, b.op("Reshape", k, heads_shape(kv_heads)), cos, sin, swap),
                 perm=[0, 2, 1, 3])
        v = b.op("Transpose", b.op("Reshape", v, heads_shape(kv_heads)), perm=[0, 2, 1, 3])
        k_all = b.op("Concat", f"past_key_values.{i}.key", k, axis=2, out_name=f"present.{i}.key")
        v_all = b.op("Concat", f"past_key_values.{i}.value", v, axis=2, out_name=f"present.{i}.value")
        # grouped queries: head h uses kv head h // rep; (B, H, T, D) -> (B, KV, rep*T, D)
        qg = b.op("Reshape", q, b.op("Concat", batch, b.ints([kv_heads, -1, head_dim]), axis=0))
        scores = b.op("Mul", b.op("MatMul", qg, b.op("Transpose", k_all, perm=[0, 1, 3, 2])), scaling)
        s5 = b.op("Reshape", scores, b.op("Concat", batch, b.ints([kv_heads, rep]), seq, b.ints([-1]), axis=0))
        s5 = b.op("Where", future, neg, s5)
        probs = b.op("Reshape", b.op("Softmax", s5, axis=-1),
                     b.op("Concat", batch, b.ints([kv_heads, -1]), b.op("Shape", k_all, start=2, end=3), axis=0))
        att = b.op("Reshape", b.op("MatMul", probs, v_all), b.op("Concat", batch, b.ints([heads, -1, head_dim]), axis=0))
        att = b.op("Reshape", b.op("Transpose", att, perm=[0, 2, 1, 3]),
                   b.op("Concat", bt_shape, b.ints([heads * head_dim]), axis=0))
        x = b.op("Add", x, linear(b, att, f"{p}.self_attn.o_proj"))
        h = _rms_norm(b, x, b.initializer(f"{p}.post_attention_layernorm.weight",
                                          dense[f"{p}.post_attention_layernorm.weight"].astype(np.float32)), eps)
        gate, up = (linear(b, h, f"{p}.mlp.{n}_proj") for n in ("gate", "up"))
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
        x = b.op("Add", x, linear(b, act, f"{p}.mlp.down_proj"))
    x = _rms_norm(b, x, b.initializer("model.norm.weight", dense["model.norm.weight"].astype(np.float32)), eps)
    if "lm_head.weight" in dense:
        linear(b, x, "lm_head", out_name="logits")
    else:  # tied to the embedding, as torch.onnx exports it: MatMul(x, Transpose(embedding))
        b.op("MatMul", x, b.op("Transpose", embed, perm=[1, 0]), out_name="logits")
    return inputs, outputs
