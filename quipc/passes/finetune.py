"""End-to-end fine-tuning of the continuous parameters of a quantized model.

After every layer is rounded, the codes stay fixed and what is still continuous is trained
to match the unquantized model: per quantized linear its input scale (in_scale: signs and
rescaling, fp16) and a gain on each row of W' (folded into the format's fp16 row scales),
and the model's norm weights. A quantized lm_head is one more such linear; when the embedding
is decoded from the head's codes (a tied model), the embedding follows the head's trained
values during training exactly as it will once they are stored. Dense embeddings and a dense
lm_head are left as they are. The loss is
KL(teacher || student) of the next-token distributions on the calibration windows; the
last `holdout` windows are never trained on and pick the epoch to keep (early stopping).
Seeded; deterministic on the CPU for a given thread count.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.modules import QuipLinearRef, kron_apply

from ..distributed import SINGLE, Group, spread
from .input_siblings import input_siblings, tie_input_scales, unique_parameters

MODES = ("none", "block", "e2e", "all")   # all = block, then e2e
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "none"     # none | block (passes/block_finetune.py) | e2e | all (block, then e2e)
    epochs: int = 2
    lr: float = 5e-4       # Adam, on parameters that start at their stored values (near 1)
    holdout: int = 8       # calibration windows kept for early stopping (at most 1/8 of them, >= 1)
    seed: int = 0
    schedule: str = "constant"   # learning rate per step: constant, or cosine decay to 0 over all epochs
    block_steps: int = 8   # block stage: Adam steps (one calibration batch each) after each round
    block_lr: float = 1e-3  # block stage: in_scale / row gains; an unrounded weight gets lr * its rms
    block_last_round: bool = True   # block stage: also tune after the block's last round
    step_windows: int = 1  # e2e: windows per Adam step (their gradients summed in window order: the
                           # ranks of a distributed compile each take some, the same floats as one process)
    tie_inputs: bool = False   # one in_scale per set of linears reading the same tensor (q/k/v, gate/up),
                               # so that backends run them as one group (passes/input_siblings.py)

    @property
    def block(self) -> bool:
        return self.mode in ("block", "all")

    @property
    def e2e(self) -> bool:
        return self.mode in ("e2e", "all")

    def validate(self) -> "FinetuneConfig":
        if self.mode not in MODES:
            raise ValueError(f"unknown fine-tuning mode {self.mode!r}; expected one of {MODES}")
        if self.epochs < 1 or self.lr <= 0 or self.holdout < 1:
            raise ValueError("fine-tuning needs epochs >= 1, lr > 0 and holdout >= 1")
        if self.step_windows < 1:
            raise ValueError(f"fine-tuning needs at least 1 window per step, not {self.step_windows}")
        if self.block_steps < 0 or self.block_lr <= 0:
            raise ValueError("block fine-tuning needs block_steps >= 0 and block_lr > 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; expected one of {SCHEDULES}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class TunableQuipLinear(nn.Module):
    """QuipLinearRef with in_scale and a per-row gain of W' as trainable parameters."""

    def __init__(self, ref: QuipLinearRef):
        super().__init__()
        self.ref = ref
        self.in_scale = nn.Parameter(ref.in_scale.detach().clone())
        self.row_gain = nn.Parameter(torch.ones(ref.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.ref
        if x.numel() // x.shape[-1] < max(ref.in_features, ref.out_features):
            return ref.apply_with(x, self.in_scale, self.row_gain)
        # many rows (a block-stage batch): the factors once over W' instead of twice over x
        # (SmolLM2's 1536x576 at 4096 rows: 0.15 s for forward and backward instead of 0.73)
        w = ref.dense_weight_with(self.in_scale, self.row_gain)
        return F.linear(x.to(w.dtype), w, ref.bias).to(x.dtype)

    def apply_to(self, layer: QuantizedLinear) -> QuantizedLinear:
        """The layer with the trained values folded into its stored fp16 tensors."""
        gain = self.row_gain.detach().double().numpy()
        out = copy.copy(layer)
        scale = layer.scale.astype(np.float64)
        out.scale = (scale * (gain[:, None] if scale.ndim == 2 else gain)).astype(np.float16)
        if layer.zero is not None:
            out.zero = (layer.zero.astype(np.float64) * gain).astype(np.float16)
        out.in_scale = self.in_scale.detach().numpy().astype(np.float16)
        out.info = {**layer.info, "finetuned": True}
        out.validate()
        return out


class TiedTunableEmbedding(nn.Module):
    """The embedding of a tied model whose table is the quantized head's: row i is
    in_scale * K_in^T (gain_i * W'_i), computed from the head being trained."""

    def __init__(self, head: TunableQuipLinear):
        super().__init__()
        self._head = [head]   # not a submodule: its parameters belong to the head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        f_in, _ = head.ref._factors()
        rows = head.ref.weight_rot[ids] * head.row_gain[ids].unsqueeze(-1)
        return kron_apply(rows, f_in, transpose=True) * head.in_scale


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every normalization module (RMSNorm / LayerNorm of any family)."""
    return {f"{name}.{pname}": p for name, mod in model.named_modules()
            if "norm" in type(mod).__name__.lower()
            for pname, p in mod.named_parameters(recurse=False)}


def held_out_windows(cfg: FinetuneConfig, windows: int) -> int:
    return max(1, min(cfg.holdout, windows // 8))


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return torch.sum(t.exp() * (t - s), dim=-1).mean()


def finetune_e2e(student: nn.Module, teacher: nn.Module, layer_names: list[str], windows: torch.Tensor,
                 cfg: FinetuneConfig, progress=None, tied_embedding: tuple[str, str] | None = None,
                 group: Group = SINGLE) -> dict:
    """Train `student` in place (its QuipLinearRef modules named in layer_names become
    TunableQuipLinear); returns {name: TunableQuipLinear}, the trained norm parameters and a
    record of the losses. tied_embedding = (embedding module, head layer name): that
    embedding is decoded from the head's codes and follows the head's trained values.
    group: the ranks of a distributed compile, each holding the same student: the windows of a
    step (and the held-out ones) are spread over them (_WindowSteps), all take the same steps."""
    cfg = cfg.validate()
    if windows.shape[0] < 2:
        raise ValueError("fine-tuning needs at least 2 calibration windows (one is held out); "
                         "pass more windows or --finetune none")
    holdout = held_out_windows(cfg, windows.shape[0])
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    teacher.eval()
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    tunables = {}
    for name in layer_names:
        ref = student.get_submodule(name)
        if not isinstance(ref, QuipLinearRef):
            raise TypeError(f"{name} is not a reference QuIP linear; fine-tuning needs the torch path")
        tunables[name] = TunableQuipLinear(ref)
        student.set_submodule(name, tunables[name])
    if tied_embedding is not None:
        emb_module, head_name = tied_embedding
        student.set_submodule(emb_module, TiedTunableEmbedding(tunables[head_name]))
    tied = []
    if cfg.tie_inputs:   # siblings found on a few tokens of the first window (their inputs are per token alike)
        probe = windows[0][None, :8]
        tied = tie_input_scales(tunables, input_siblings(student, layer_names, lambda: student(input_ids=probe)))
    norms = norm_parameters(student)
    for p in norms.values():
        p.requires_grad_(True)
    params = unique_parameters([p for t in tunables.values() for p in t.parameters() if p.requires_grad]
                               + list(norms.values()))
    train, held = windows[:-holdout], windows[-holdout:]
    steps = _WindowSteps(student, teacher, params, group)

    def state() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    opt = torch.optim.Adam(params, lr=cfg.lr)
    n_steps = cfg.epochs * -(-int(train.shape[0]) // cfg.step_windows)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps) if cfg.schedule == "cosine"
             else None)
    history = [steps.holdout_kl(held)]
    best, best_state = history[0], state()
    order = torch.Generator().manual_seed(cfg.seed)
    student.train(False)
    for _epoch in range(cfg.epochs):
        train_loss = []
        perm = torch.randperm(train.shape[0], generator=order).tolist()
        for start in range(0, len(perm), cfg.step_windows):
            step = [train[i] for i in perm[start:start + cfg.step_windows]]
            opt.zero_grad(set_to_none=True)
            train_loss += steps.gradient(step)
            opt.step()
            if sched is not None:
                sched.step()
            if progress is not None:
                progress.update(len(step))
        history.append(steps.holdout_kl(held))
        if history[-1] < best:
            best, best_state = history[-1], state()
        else:
            break   # the held-out loss stopped improving: keep the best epoch
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
    for p in params:
        p.requires_grad_(False)
    record = {**cfg.to_dict(), "holdout_kl": history, "kept_epoch": history.index(best),
              "train_windows": int(train.shape[0]), "held_out_windows": holdout, "tied_input_sets": len(tied),
              "seconds": time.time() - t0,
              "last_epoch_train_kl": float(np.mean(train_loss)) if train_loss else None}
    return {"tunables": tunables, "norms": {k: v.detach().clone() for k, v in norms.items()},
            "record": record}


class _WindowSteps:
    """One step's gradient: the KL of each of its windows differentiated alone (window j of a
    step on rank j % world), the gradients summed in window order and divided by their count,
    so one process and any number of ranks compute the same floats (a one-window step is that
    window's gradient exactly)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, params: list[nn.Parameter], group: Group):
        self.student, self.teacher, self.params, self.group = student, teacher, params, group

    def _kl_of(self, window: torch.Tensor) -> torch.Tensor:
        ids = window[None]
        with torch.no_grad():
            target = self.teacher(input_ids=ids).logits
        return _kl(target, self.student(input_ids=ids).logits)

    def gradient(self, step: list[torch.Tensor]) -> list[float]:
        """p.grad of every parameter set to the step's mean gradient; returns each window's loss."""
        def one(j: int):
            for p in self.params:
                p.grad = None
            loss = self._kl_of(step[j])
            loss.backward()
            grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
            return float(loss.detach()), grads

        results = spread(self.group, len(step), one)
        for i, p in enumerate(self.params):
            parts = [grads[i] for _, grads in results if grads[i] is not None]
            if not parts:
                p.grad = None     # unused by every window: Adam leaves it as a one-window step would
                continue
            total = parts[0]
            for g in parts[1:]:
                total = total + g
            p.grad = total / len(step)     # / 1 is exact: a one-window step is that window's gradient
        return [loss for loss, _ in results]

    def holdout_kl(self, held: torch.Tensor) -> float:
        with torch.no_grad():
            return float(np.mean(spread(self.group, int(held.shape[0]), lambda j: self._kl_of(held[j]))))
