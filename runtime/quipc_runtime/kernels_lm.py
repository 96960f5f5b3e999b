"""A lean greedy decoder over an artifact loaded with backend "kernels" (CPU): the same
plans, norms and rotary tables as the transformers model, without its per-token Python.

Decoding SmolLM2 w2 through transformers spent ~12 of ~19 ms a token around the kernels (its
cache concatenates every layer's keys and values each step; each block walks a dozen modules,
casts and checks, ~40 framework ops). `KernelsLM` runs the Llama-style families (RMSNorm,
rotary, grouped-query attention, gated MLP: llama, mistral, qwen2, qwen3, phi3 with its fused
qkv / gate_up projections, gemma2 and gemma3 with their (1 + w) norms, post-attention / post-MLP
norms, GELU-tanh, attention soft-capping (gemma2) and per-layer-type rotary tables (gemma3))
itself, sliding-window layers included: a cache preallocated once and written in place, the
rotary tables computed once for every position by the model's own rotary module, and each
decode step one C++ call per block (`_kernels.DecoderLayer`, cpp/decoder_layer.h: the seven
plans and everything between them). A prompt runs through the same plans with torch's ops
between them (its GEMMs dominate); so does a decode step whose block has a linear that is not
a plain plan (8-bit row patches) or another activation. Other families and settings this loop
does not reproduce (bidirectional attention, partial rotary, rotary scalings that change with
the length) are named by `unsupported(model)`; the callers then keep the
transformers model.

The interface is TvmLM's: `new_cache(n)`, `prefill(ids, cache)` and `decode(token, pos, cache)`
return the last position's logits (numpy, (V,)), `generate(ids, max_new_tokens, eos_token_id)`
greedy tokens (1, L + n); `extend(ids, pos, cache)` runs several tokens after the cache's first
`pos` (a conversation's next turn, a prompt in chunks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import KernelQuipLinear, default_threads
from .tvm_runtime import greedy  # numpy only; tvm itself is imported lazily there

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")   # RMSNorm scales by (1 + w); post-attention and post-MLP norms
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def unsupported(model) -> str | None:
    """Why `KernelsLM` cannot run `model`, or None when it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of the lean decoder's families {FAMILIES}"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the model is not on the CPU"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "the model lacks the model.layers / lm_head layout of its family"
    kinds = _rope_types(config)
    if any("dynamic" in k or "longrope" in k for k in kinds):
        return f"rotary scaling {sorted(kinds)} changes with the sequence length"
    if float(getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        return "partial rotary embedding (part of each head unrotated)"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention is not causal decoding"
    return None


def _window(layer, config) -> int:
    """The layer's sliding window (0: none). qwen2/qwen3/gemma3 set it per layer (None where
    unused); mistral's attention reads the config's."""
    attn = layer.self_attn
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    if not window or int(window) >= int(getattr(config, "max_position_embeddings", 1 << 30)):
        return 0
    return int(window)


def _rope_kind(layer, rotary) -> str | None:
    """The rotary table a layer reads: its layer type where the rotary module keeps one per
    type (gemma3's `layer_types`), else None (one table)."""
    return getattr(layer.self_attn, "layer_type", None) if hasattr(rotary, "layer_types") else None


def lean(model, threads: int | None = None):
    """KernelsLM(model) where it runs the model, else the model itself."""
    return model if unsupported(model) else KernelsLM(model, threads=threads)


def load_lean(folder, int8_activations: bool = False, threads: int | None = None) -> KernelsLM:
    """An artifact loaded with backend "kernels" (the loader's other defaults) as a KernelsLM."""
    from . import load

    return KernelsLM(load(folder, backend="kernels", int8_activations=int8_activations), threads=threads)


def _rope_types(config) -> set[str]:
    """The rotary types a config names (one, or one per layer type in transformers 5)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return {"default"}
    records = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    return {str(r.get("rope_type", r.get("type", "default"))) for r in records}


def _plain_plan(module):
    """The CPU plan of a KernelQuipLinear that is nothing but its plan (no 8-bit row patch), else None."""
    plain = isinstance(module, KernelQuipLinear) and module.device.type == "cpu" and module.row_ids is None
    return module._plan if plain else None


def _projections(parent, names: tuple[str, ...], fused: str) -> tuple:
    """The parent's separate projections, or (its fused one, None, ...) where it has that."""
    if hasattr(parent, fused):
        return (getattr(parent, fused),) + (None,) * (len(names) - 1)
    return tuple(getattr(parent, n) for n in names)


def _linear(module, threads: int):
    if module is None:
        return None
    """f(x (B, n)) -> (B, m): the kernels' plan on the tensor's memory where the module is a
    plain KernelQuipLinear on the CPU, else the module itself."""
    plan = _plain_plan(module)
    if plan is not None:
        m = module.out_features

        def run(x):
            y = torch.empty(x.shape[0], m)
            plan.forward(x.contiguous().numpy(), out=y.numpy(), threads=threads)
            return y
        return run
    return module


@dataclass
class _Block:
    ln1: torch.Tensor        # input norm (of the attention)
    ln2: torch.Tensor        # norm of the MLP's input
    eps1: float
    eps2: float
    q: object                # k and v None: q is the fused qkv_proj (phi3)
    k: object
    v: object
    o: object
    gate: object             # None: up is the fused gate_up_proj (phi3)
    up: object
    down: object
    act: object
    scaling: float           # attention logit scale
    softcap: float           # attention logit soft-capping (gemma2; 0: none)
    q_norm: tuple | None     # (weight, eps) of the per-head norms (qwen3, gemma3)
    k_norm: tuple | None
    post_attn: tuple | None  # (weight, eps) of gemma2/3's norms of the attention's and MLP's outputs
    post_mlp: tuple | None
    window: int              # sliding window (0: none)
    rope: int                # index of its rotary table in the cache


def _norm(module, unit_offset: bool = False) -> tuple[torch.Tensor, float]:
    """(weight, eps) of an RMSNorm as y = x / rms(x) * weight; Gemma's scale by (1 + w)."""
    w = module.weight.detach().float()
    eps = getattr(module, "variance_epsilon", None)
    return (1.0 + w if unit_offset else w), float(module.eps if eps is None else eps)


def _attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """softmax(scale q k^T [soft-capped], masked) v: q (H, n, d), k / v (KH, keys, d); mask None:
    every key for one query, the square causal mask for several (KernelsLM._attended)."""
    n, keys = q.shape[1], k.shape[1]
    causal = mask is None and n > 1
    if not softcap:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=k.shape[0] != q.shape[0])[0]
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    s = torch.tanh(q @ k.transpose(1, 2) * scale / softcap) * softcap
    if causal:
        mask = torch.ones(n, keys, dtype=torch.bool).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _normed(y: torch.Tensor, norm: tuple | None) -> torch.Tensor:
    """y, or its RMSNorm where the block has one there (gemma2/3's post norms)."""
    return y if norm is None else F.rms_norm(y, (y.shape[-1],), *norm)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


class KernelCache:
    """Keys and values of every layer, (layers, kv_heads, capacity, head_dim) each, and the
    rotary tables for positions [0, capacity), (tables, capacity, head_dim) each: one table,
    or one per layer type (gemma3's sliding and global layers)."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, cos, sin):
        self.k = k = torch.zeros(layers, kv_heads, capacity, head_dim)
        self.v = v = torch.zeros(layers, kv_heads, capacity, head_dim)
        self.cos, self.sin = cos, sin
        self.capacity = capacity
        # numpy views of the same memory, for the C++ blocks
        self.k_np, self.v_np, self.cos_np, self.sin_np = k.numpy(), v.numpy(), cos.numpy(), sin.numpy()


class KernelsLM:
    """Greedy decoding of a kernels-backend model of a Llama-style family (module doc)."""

    def __init__(self, model, threads: int | None = None):
        why = unsupported(model)
        if why:
            raise ValueError(f"KernelsLM cannot run this model: {why}")
        self.model, inner = model, model.model
        config = model.config
        self.threads = threads or default_threads()
        t = self.threads
        attn0 = inner.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.hidden = int(config.hidden_size)
        self.max_pos = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.vocab = int(config.vocab_size)
        self.eos_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
        self.softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        gemma = config.model_type in GEMMA
        # the rotary tables: one, or one per layer type (in the order the layers first name them)
        layer_kinds = [_rope_kind(layer, inner.rotary_emb) for layer in inner.layers]
        self.rope_kinds = list(dict.fromkeys(layer_kinds))
        self.blocks, linears = [], []
        for layer, kind in zip(inner.layers, layer_kinds):
            a, mlp = layer.self_attn, layer.mlp
            ln2 = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
            (w1, e1), (w2, e2) = _norm(layer.input_layernorm, gemma), _norm(ln2, gemma)
            q, k, v = _projections(a, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
            up, gate = _projections(mlp, ("up_proj", "gate_proj"), "gate_up_proj")
            linears.append((q, k, v, a.o_proj, gate, up, mlp.down_proj))
            self.blocks.append(_Block(
                ln1=w1, ln2=w2, eps1=e1, eps2=e2,
                q=_linear(q, t), k=_linear(k, t), v=_linear(v, t), o=_linear(a.o_proj, t),
                gate=_linear(gate, t), up=_linear(up, t), down=_linear(mlp.down_proj, t),
                act=getattr(mlp, "act_fn", None) or mlp.activation_fn, scaling=float(a.scaling),
                softcap=float(getattr(a, "attn_logit_softcapping", None) or 0.0),
                q_norm=_norm(a.q_norm, gemma) if hasattr(a, "q_norm") else None,
                k_norm=_norm(a.k_norm, gemma) if hasattr(a, "k_norm") else None,
                post_attn=_norm(layer.post_attention_layernorm, True) if gemma else None,
                post_mlp=_norm(layer.post_feedforward_layernorm, True) if gemma else None,
                window=_window(layer, config), rope=self.rope_kinds.index(kind)))
        self.inter = int(inner.layers[0].mlp.down_proj.in_features)
        self.native = self._native_layers(linears, config)
        self.final_norm = _norm(inner.norm, gemma)
        self.embed, self.head = inner.embed_tokens, model.lm_head

    def _native_layers(self, linears, config):
        """The blocks as C++ DecoderLayers (decoder_layer.h) for decode, when every linear is
        a kernels plan and the MLP's activation is SiLU or GELU-tanh; None otherwise (the torch
        glue runs). linears: per block its (q, k, v, o, gate, up, down) modules, None where fused."""
        from .kernels import _ext

        act = ACTIVATIONS.get(str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "")))
        if act is None:
            return None
        out = []
        for mods in linears:
            plans = [None if m is None else _plain_plan(m) for m in mods]
            if any(p is None and m is not None for p, m in zip(plans, mods)):
                return None
            b = self.blocks[len(out)]
            qk = (_f32(b.q_norm[0]), _f32(b.k_norm[0]), b.q_norm[1]) if b.q_norm else (None, None, 0.0)
            post = dict(post_attn=_f32(b.post_attn[0]), post_mlp=_f32(b.post_mlp[0]),
                        post_eps=b.post_attn[1]) if b.post_attn else {}
            out.append(_ext.DecoderLayer(
                self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter, b.eps1, b.eps2,
                b.scaling, _f32(b.ln1), _f32(b.ln2), *qk, *plans, window=b.window, act=act,
                attn_softcap=b.softcap, **post))
        return out

    # --- cache ---------------------------------------------------------------------------
    def new_cache(self, capacity: int) -> KernelCache:
        if not 0 < capacity <= self.max_pos:
            raise ValueError(f"a cache of {capacity} positions: the model has {self.max_pos}")
        rotary, x, pos = self.model.model.rotary_emb, torch.zeros(1, dtype=torch.float32), torch.arange(capacity)[None]
        with torch.no_grad():
            tables = [rotary(x, pos) if kind is None else rotary(x, pos, kind) for kind in self.rope_kinds]
        cos = torch.stack([c[0].float() for c, _ in tables]).contiguous()
        sin = torch.stack([s[0].float() for _, s in tables])
        half = self.head_dim // 2
        # rotate_half(x) * sin == flip(x's halves) * sin_signed: the first half's sign folded in
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).contiguous()
        return KernelCache(len(self.blocks), self.kv_heads, capacity, self.head_dim, cos, sin)

    # --- one forward over tokens [pos, pos + n) -------------------------------------------
    def _rotate(self, x, cos, sin):
        """x (n, heads, d) rotated at the rows' positions; cos / sin (n, 1, d)."""
        n, h, d = x.shape
        flipped = x.view(n, h, 2, d // 2).flip(2).view(n, h, d)
        return torch.addcmul(x * cos, flipped, sin)

    def _forward(self, ids: torch.Tensor, pos: int, cache: KernelCache) -> torch.Tensor:
        """Tokens at positions [pos, pos + n) through the blocks in torch, after the cache's
        [0, pos); the last one's hidden state after the final norm (1, hidden)."""
        n = ids.shape[0]
        if pos < 0 or pos + n > cache.capacity:
            raise ValueError(f"positions [{pos}, {pos + n}) are outside the cache ({cache.capacity} positions)")
        H, KH, d, end = self.heads, self.kv_heads, self.head_dim, pos + n
        h = self.embed(ids[None])[0].float()
        for i, b in enumerate(self.blocks):
            cos, sin = cache.cos[b.rope, pos:end, None], cache.sin[b.rope, pos:end, None]
            x = F.rms_norm(h, (self.hidden,), b.ln1, b.eps1)
            if b.k is None:   # fused qkv_proj
                q, k, v = b.q(x).split((H * d, KH * d, KH * d), dim=-1)
            else:
                q, k, v = b.q(x), b.k(x), b.v(x)
            q, k, v = q.reshape(n, H, d), k.reshape(n, KH, d), v.reshape(n, KH, d)
            if b.q_norm is not None:
                q, k = F.rms_norm(q, (d,), *b.q_norm), F.rms_norm(k, (d,), *b.k_norm)
            cache.k[i, :, pos:end] = self._rotate(k, cos, sin).transpose(0, 1)
            cache.v[i, :, pos:end] = v.transpose(0, 1)
            first, mask = self._attended(b.window, pos, n)
            attn = _attention(self._rotate(q, cos, sin).transpose(0, 1), cache.k[i, :, first:end],
                              cache.v[i, :, first:end], mask, b.scaling, b.softcap)
            h = h + _normed(b.o(attn.transpose(0, 1).reshape(n, H * d)), b.post_attn)
            x = F.rms_norm(h, (self.hidden,), b.ln2, b.eps2)
            g, u = b.up(x).chunk(2, dim=-1) if b.gate is None else (b.gate(x), b.up(x))
            h = h + _normed(b.down(b.act(g) * u), b.post_mlp)
        return F.rms_norm(h[-1:], (self.hidden,), *self.final_norm)

    @staticmethod
    def _attended(window: int, pos: int, n: int):
        """(first key position, boolean mask or None) of queries [pos, pos + n): causal, and
        within the last `window` positions of each query where the layer slides. None: every key
        from `first` (one query), or the square causal case (a prompt from 0 without a window),
        which SDPA's is_causal computes without a mask."""
        first = max(0, pos + 1 - window) if window else 0   # of the first query
        if n == 1 or (pos == 0 and not window):
            return first, None
        q = torch.arange(pos, pos + n)[:, None]
        k = torch.arange(first, pos + n)[None]
        return first, (k <= q) & (k > q - window) if window else k <= q

    def _step_native(self, token: int, pos: int, cache: KernelCache) -> torch.Tensor:
        """One token through the C++ blocks; the last hidden state after the final norm (1, hidden)."""
        if not 0 <= pos < cache.capacity:
            raise ValueError(f"position {pos} is outside the cache ({cache.capacity} positions)")
        h = self.embed(torch.tensor([[token]]))[0].float().contiguous()
        hn, kn, vn = h.numpy()[0], cache.k_np, cache.v_np
        for i, layer in enumerate(self.native):
            r = self.blocks[i].rope
            layer.step(hn, pos, kn[i], vn[i], cache.cos_np[r, pos], cache.sin_np[r, pos], self.threads)
        return F.rms_norm(h, (self.hidden,), *self.final_norm)

    def _logits(self, ids, pos: int, cache: KernelCache) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # the kernels' pool has the cores (kernels.hand_threads_to_kernels)
        try:
            with torch.no_grad():
                ids = np.asarray(ids, dtype=np.int64).reshape(-1)
                if ids.size == 1 and self.native is not None:
                    x = self._step_native(int(ids[0]), pos, cache)
                else:
                    x = self._forward(torch.as_tensor(ids), pos, cache)
                logits = self.head(x)[0].float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                return logits.numpy()
        finally:
            torch.set_num_threads(threads)

    def prefill(self, ids, cache: KernelCache) -> np.ndarray:
        """The prompt at positions [0, L); the last row's logits (V,)."""
        return self.extend(ids, 0, cache)

    def extend(self, ids, pos: int, cache: KernelCache) -> np.ndarray:
        """Tokens at positions [pos, pos + L) after the cache's [0, pos) (a conversation's next
        turn, or a long prompt in chunks); the last row's logits (V,)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            raise ValueError("no tokens to run")
        return self._logits(ids, int(pos), cache)

    def decode(self, token: int, pos: int, cache: KernelCache) -> np.ndarray:
        """One token at position `pos` (the cache holds [0, pos)); its logits (V,)."""
        return self._logits([int(token)], int(pos), cache)

    def generate(self, ids, max_new_tokens: int, eos_token_id: int | None = None,
                 stop_at_eos: bool = True) -> np.ndarray:
        """Greedy generation: prompt + new tokens as an int64 array (1, L + n)."""
        prompt = np.asarray(ids, dtype=np.int64).reshape(-1)
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        total = prompt.size + max(0, max_new_tokens)
        if total > self.max_pos:
            raise ValueError(f"{prompt.size} prompt + {max_new_tokens} new tokens exceed the model's "
                             f"{self.max_pos} positions")
        cache = self.new_cache(max(total, 1))
        return greedy(self, prompt, cache, max_new_tokens, eos if stop_at_eos else None)
