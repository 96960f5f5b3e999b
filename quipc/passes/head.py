"""The output projection (lm_head) and the token embedding table.

lm_head is quantized by the same pass as the decoder blocks, after them: its Hessian is
E[x x^T] of the final hidden states (after the last norm) of the calibration windows, run
through the *quantized* blocks. An untied head goes through `quantize_linear` with its own
bits. A tied head (one tensor for lm_head and the embedding) is quantized here with an
identity output transform (only the input side rotated, its signs folded into in_scale),
so that row i of its effective weight is (W'[i] @ K_in) * in_scale: the embedding lookup
decodes the code rows of the token ids, and the folder stores one table, not two.

The head's most frequent tokens keep their rows at 8 bits (a row patch, quipc_runtime.layer): a
token's logit error costs in proportion to how often the model predicts it, so the few thousand
frequent tokens carry most of the head's rounding cost (SmolLM2, 4-bit grid head, fp32 blocks:
+3.19 % ppl, +1.10 % with the 4096 most frequent rows at 8 bits). Frequency is counted on the
calibration windows, ties (and tokens never seen) ordered by id: a BPE vocabulary lists its
merges roughly by frequency in the tokenizer's own corpus.

The embedding, when it is not the head's codes, is stored as an integer table (8 bits per
row, or 4 bits per group of 32, fp16 scales; quipc_runtime.embedding), as fp16, or as it is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from quipc_runtime.embedding import EmbeddingTable
from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.transforms import Transform, derive_seed

from ..config import DENSE_BITS, QuantConfig
from ..distributed import SINGLE, Group
from .encoders import encode, resolve_format
from .grid import fit_grid
from .hessian import HessianAccumulator, regularize
from .incoherence import apply_rows, mu_hessian, mu_weight, rotate_hessian
from .ldlq import proxy_loss
from .spread import encode_rows

TABLE_GROUP = {8: None, 4: 32}  # entries per fp16 scale/zero group (None: one per row)


@dataclass(frozen=True)
class HeadPlan:
    """What happens to lm_head and the embedding of one model under one config."""
    head: str            # module names
    embed: str
    tied: bool
    head_bits: int       # 2/3/4, or 32 = kept dense
    embed_mode: str      # "head" (the head's codes) | "table" | "dense"
    embed_bits: int      # table: 8 or 4; dense: 16 or 32; head: the head's bits

    @property
    def head_quantized(self) -> bool:
        return self.head_bits != DENSE_BITS

    def dense_tensors(self, dense: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The dense tensors the artifact still stores, given this plan."""
        dense = dict(dense)
        hk, ek = f"{self.head}.weight", f"{self.embed}.weight"
        if self.head_quantized:
            dense.pop(hk, None)
        elif self.tied and not (self.embed_mode == "dense" and self.embed_bits == DENSE_BITS):
            # the embedding changes, the dense head must not: store the head on its own
            dense[hk] = model.get_output_embeddings().weight.detach().clone()
        if self.embed_mode in ("head", "table"):
            dense.pop(ek, None)
        elif self.embed_bits == 16:
            dense[ek] = dense[ek].detach().to(torch.float16)
        return dense

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ValueError("module not found in the model")


def plan_for(model: nn.Module, cfg: QuantConfig) -> HeadPlan:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or not isinstance(head, nn.Linear) or not isinstance(embed, nn.Embedding):
        if cfg.head_bits != DENSE_BITS or cfg.embed_bits not in ("auto", DENSE_BITS, str(DENSE_BITS)):
            raise ValueError("this model has no nn.Linear lm_head and nn.Embedding input embedding: "
                             "use --head-bits 32 --embed-bits 32")
        return HeadPlan("lm_head", "model.embed_tokens", False, DENSE_BITS, "dense", DENSE_BITS)
    tied = head.weight is embed.weight
    names = (module_name(model, head), module_name(model, embed))
    eb = str(cfg.embed_bits)
    if eb == "auto":
        if cfg.head_bits == DENSE_BITS:
            eb = str(DENSE_BITS)
        else:
            eb = "head" if tied and head.bias is None else "8"
    if eb == "head":
        if not tied:
            raise ValueError("--embed-bits head shares the lm_head's codes with the embedding, which "
                             "needs a tied model (lm_head and the embedding one tensor); this one is untied")
        if cfg.head_bits == DENSE_BITS:
            raise ValueError("--embed-bits head needs a quantized lm_head (--head-bits 2, 3 or 4)")
        if head.bias is not None:
            raise ValueError("--embed-bits head needs an lm_head without bias")
        return HeadPlan(*names, tied, cfg.head_bits, "head", cfg.head_bits)
    bits = int(eb)
    return HeadPlan(*names, tied, cfg.head_bits, "table" if bits in TABLE_GROUP else "dense", bits)


# --- the head's Hessian -------------------------------------------------------------------
def final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """The norm applied after the last block (Llama-style `model.norm`)."""
    for parent in model.modules():
        if any(child is blocks for child in parent.children()):
            for attr in ("norm", "final_layernorm", "ln_f"):
                mod = getattr(parent, attr, None)
                if isinstance(mod, nn.Module):
                    return mod
    raise ValueError("cannot find the final norm after the decoder blocks (looked for norm, "
                     "final_layernorm, ln_f): quantize this model with --head-bits 32")


def head_hessian(model: nn.Module, blocks: nn.ModuleList, hidden: list[torch.Tensor]) -> torch.Tensor:
    """E[x x^T] of lm_head's input: the final norm of the last block's outputs."""
    norm = final_norm(model, blocks)
    acc = None
    with torch.no_grad():
        for h in hidden:
            x = norm(h)
            if acc is None:
                acc = HessianAccumulator(x.shape[-1], x.device)
            acc.add(x)
    if acc is None:
        raise ValueError("no calibration hidden states for lm_head")
    return acc.mean().cpu()


# --- quantizing the head --------------------------------------------------------------------
def quantize_head(model: nn.Module, plan: HeadPlan, hessian: torch.Tensor | None,
                  cfg: QuantConfig, tokens: torch.Tensor | None = None, group: Group = SINGLE) -> QuantizedLinear:
    """The quantized lm_head; with cfg.head_int8_rows, its rows of the most frequent of `tokens`
    (the calibration windows' ids) kept at 8 bits. group: the ranks of a distributed compile,
    which share a shared head's rows (passes/spread.encode_rows); every rank returns the layer."""
    lin = model.get_submodule(plan.head)
    w = lin.weight.detach().cpu()
    bias = None if lin.bias is None else lin.bias.detach().cpu()
    hcfg = dataclasses.replace(cfg, bits=plan.head_bits, format=cfg.head_format)
    if plan.embed_mode != "head":
        from .methods import LayerInput, quantize_linear

        layer = quantize_linear(LayerInput(plan.head, w, bias, hessian), hcfg)
    else:
        layer = quantize_shared_head(plan.head, w, hessian, hcfg, group)
    k = patch_rows(cfg.head_int8_rows, w.shape[0])
    if k and bias is not None:
        raise ValueError(f"{plan.head} has a bias: keeping its rows at 8 bits is not supported "
                         "(use --head-int8-rows 0)")
    if k:
        ids = frequent_rows(tokens, w.shape[0], k)
        layer = with_row_patch(layer, ids, w[torch.from_numpy(ids).long()].float().numpy())
    return layer


def patch_rows(int8_rows: int, vocab: int) -> int:
    """Rows kept at 8 bits: int8_rows, at most an eighth of the vocabulary."""
    return min(int8_rows, vocab // 8)


def frequent_rows(tokens: torch.Tensor | None, vocab: int, k: int) -> np.ndarray:
    """The k most frequent ids of `tokens` (ascending), count ties and unseen ids by lowest id."""
    counts = np.zeros(vocab, np.int64)
    if tokens is not None:
        ids = tokens.reshape(-1).cpu().numpy().astype(np.int64)
        ids = ids[(ids >= 0) & (ids < vocab)]
        counts = np.bincount(ids, minlength=vocab)[:vocab]
    order = np.lexsort((np.arange(vocab), -counts))   # by count descending, then id ascending
    return np.sort(order[:k]).astype(np.int32)


def with_row_patch(layer: QuantizedLinear, ids: np.ndarray, rows: np.ndarray) -> QuantizedLinear:
    """`layer` with `rows` (k, n) float, the original weights of rows `ids`, kept at 8 bits
    (symmetric, one fp16 scale per row)."""
    rows = rows.astype(np.float32)
    scale = (np.abs(rows).max(axis=1) / 127.0).astype(np.float16)
    step = scale.astype(np.float32)
    safe = np.where(step > 0, step, 1.0)
    values = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    out = dataclasses.replace(layer, row_ids=np.ascontiguousarray(ids, np.int32), row_values=values,
                              row_scale=scale, info={**layer.info, "rows_8bit": int(len(ids))})
    out.validate()
    return out


def quantize_shared_head(name: str, weight: torch.Tensor, hessian: torch.Tensor | None,
                         cfg: QuantConfig, group: Group = SINGLE) -> QuantizedLinear:
    """cfg.method on the head with an identity output transform (quip: input side rotated
    only), in cfg.format, so the codes decode row by row into the embedding."""
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: the weight holds NaN or Inf; refusing to quantize it")
    fmt = resolve_format(cfg.format, cfg.bits, n, m)
    cfg = dataclasses.replace(cfg, format=fmt)
    t_out = Transform("identity", m)
    info: dict = {"method": cfg.method, "mu_w": mu_weight(w), "output_transform": "identity (shared with embedding)"}
    stored_in, in_scale, w_q, h_q = Transform("identity", n), None, w, None
    if cfg.method == "rtn":
        enc = encode(fmt, w, None, dataclasses.replace(cfg, grid="minmax"))
        if hessian is not None:
            h_q = hessian.to(torch.float64)
    else:
        if hessian is None:
            raise ValueError(f"{name}: method {cfg.method} needs a calibration Hessian")
        h_damped, hinfo = regularize(hessian, cfg.damp, name)
        info["hessian"] = hinfo
        info["mu_h"] = mu_hessian(h_damped)
        if cfg.method == "quip":
            t_in = Transform.make(cfg.incoherence, n, derive_seed(cfg.seed, name, "in"))
            in_scale = torch.from_numpy(t_in.sign_vector()).to(torch.float16).numpy()
            w_q = apply_rows(w, t_in)                  # W V^T: rows rotated, output side untouched
            h_q = rotate_hessian(h_damped, t_in)
            stored_in = Transform(t_in.kind, n, t_in.orders, t_in.seed)  # signs live in in_scale
            info.update(incoherence=t_in.kind, mu_w_after=mu_weight(w_q), mu_h_after=mu_hessian(h_q))
        elif cfg.method == "ldlq":
            h_q = h_damped
        else:
            raise ValueError(f"unknown method {cfg.method!r}")
        enc = encode_rows(fmt, w_q, h_q, cfg, group)
    if h_q is not None:  # relative proxy losses in the domain where the rounding ran (H' = V H V^T)
        ref = max(proxy_loss(torch.zeros_like(w_q), w_q, h_q), 1e-30)
        rtn = fit_grid(w_q, cfg.bits, "minmax")
        info["proxy_loss_rtn"] = proxy_loss(w_q, rtn.round(w_q), h_q) / ref
        info["proxy_loss"] = proxy_loss(w_q, enc.values.double(), h_q) / ref
    layer = QuantizedLinear(
        name=name, out_features=m, in_features=n, bits=cfg.bits, codes=enc.codes, scale=enc.scale,
        zero=enc.zero, format=fmt, t_in=stored_in, t_out=t_out, in_scale=in_scale, bias=None, info=info)
    layer.validate()
    return layer


# --- the embedding table --------------------------------------------------------------------
def embedding_table(model: nn.Module, plan: HeadPlan) -> EmbeddingTable:
    w = model.get_submodule(plan.embed).weight.detach().cpu().float().numpy()
    group = TABLE_GROUP[plan.embed_bits]
    if group is not None:  # the largest divisor of the row length up to the nominal group
        group = max(g for g in range(1, group + 1) if w.shape[1] % g == 0)
    return EmbeddingTable.quantize(plan.embed, w, plan.embed_bits, group)
