"""The compile's head refit: lm_head (and a tied embedding, its codes) quantized again after the
e2e stage, on the Hessian of the *fine-tuned* model's final hidden states, with its own damping.

The head is first quantized after the blocks, on the hidden states of the rounded blocks, and the
e2e stage trains the rest of the model around it; by then those hidden states have moved (norms,
row scales and sign vectors tuned), so the head's rounding is stale. Quantizing it again from the
fp32 weights on the finished model's statistics, damped more strongly against the calibration
text's shift (data-free: the model's own generated text), is what brought the data-free w2 head's
perplexity cost from +2.82 % to +1.02 % (docs/results/whole-model.md; quipc.config.CLI_HEAD_REFIT_DAMP).

The hidden states are taken with the fp32 embedding in front, as the blocks' Hessians are. The new
head file gets a new name and one manifest write switches to it, so an interrupted refit is run
again by --resume, and a finished one is not.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quipc_runtime import artifact as art
from quipc_runtime.loader import load_model as load_artifact

from .passes import head as headpass

REFIT_FILE = "head_refit.safetensors"


def final_hidden_hessian(model: torch.nn.Module, blocks_prefix: str, windows: torch.Tensor, batch: int,
                         progress: bool = False) -> torch.Tensor:
    """E[x x^T] of lm_head's input (the final norm's output, the norm after the blocks at
    `blocks_prefix`) of `model` over `windows`, float64."""
    norm = headpass.final_norm(model, model.get_submodule(blocks_prefix))
    box: dict = {"acc": None}

    def grab(_module, _inputs, out):
        if box["acc"] is None:
            box["acc"] = headpass.HessianAccumulator(out.shape[-1])
        box["acc"].add(out)

    trunk = model.base_model if model.base_model is not model else model
    hook = norm.register_forward_hook(grab)
    try:
        with torch.no_grad():
            for i in tqdm(range(0, windows.shape[0], batch), desc="head refit: hidden states",
                          unit="batch", disable=not progress):
                trunk(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        hook.remove()
    if box["acc"] is None or box["acc"].count == 0:
        raise ValueError("no calibration windows for the head refit")
    return box["acc"].mean().cpu()


def run_head_refit(out: Path, manifest: dict, model: torch.nn.Module, plan, windows: torch.Tensor,
                   cfg, batch: int, progress: bool = True) -> dict:
    """Quantize `model`'s (the unquantized source's) lm_head again on the statistics of the
    fine-tuned artifact in `out`, at cfg.head_refit_damp; returns the manifest, written."""
    if "head_refit" in manifest:
        return manifest
    t0 = time.time()
    student = load_artifact(out, allow_incomplete=True)   # the folder as the e2e stage left it
    student.set_input_embeddings(model.get_input_embeddings())   # fp32 rows in front, as for the blocks
    windows = windows.cpu()   # on the CPU, as the e2e stage's student (finetune_stage._load_student)
    hessian = final_hidden_hessian(student, manifest["blocks_prefix"], windows, batch, progress)
    del student
    old = manifest["head"]
    layer = headpass.quantize_head(model, plan, hessian,
                                   dataclasses.replace(cfg, damp=cfg.head_refit_damp), tokens=windows)
    rec = art.write_layers(out, REFIT_FILE, [layer])
    rec["layers"][0]["storage_bits"] = layer.storage_bits()
    manifest["head"] = {**rec, "module": old["module"], "tied": old["tied"]}
    manifest["head_refit"] = {"damp": cfg.head_refit_damp, "windows": int(windows.shape[0]),
                              "proxy_loss": layer.info.get("proxy_loss"), "seconds": round(time.time() - t0, 1)}
    art.write_manifest(out, manifest)
    if old["file"] != rec["file"]:
        art.safe_path(out, old["file"]).unlink(missing_ok=True)
    return manifest
