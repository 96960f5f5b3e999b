"""`quipc compile model.onnx --bits B -o out.onnx`: quantize the MatMul/Gemm layers of an
ONNX language model with the same QuIP pass as the torch path.

What it does:
1. Reads and checks the input (never modifies it): an ONNX file with its external data,
   default-domain opset >= 13, at least one MatMul/Gemm whose weight is a constant 2-D float
   initializer. Skipped: the output projection onto the vocabulary (lm_head, tied or not)
   unless QuantConfig.quantize_lm_head, and MatMuls whose weight is not constant.
2. Calibration tokens: `calib.text` is token ids (`.npy`: an integer array; `.ids`: integers
   separated by whitespace) or text, which needs a tokenizer (`tokenizer`: a folder, a .gguf
   or an alias; else a `tokenizer/` folder beside the model). Without calib.text (data-free)
   the model samples its own windows with onnxruntime (temperature 1, top-k 50, each started
   from a random token; seeded by QuantConfig.seed).
3. Calibration and quantization, sequential (default for every method but rtn, which needs no
   Hessian; quipc.frontend.onnx_sequential): the graph is cut before the first target node of
   each distinct target input (q/k/v share one input, gate/up share one), and each piece runs
   as its own small onnxruntime model over all windows, carrying only the tensors that later
   pieces read. At each cut H = E[x x^T] of that input is taken from the model whose earlier
   layers are already quantized (their nodes read the effective weight of the stored layer),
   its layers are quantized, and the piece up to the next cut runs with them: the ONNX
   counterpart of the torch path's block-by-block calibration, cut per shared input rather
   than per block. calibration="one-pass" instead takes every H from one onnxruntime pass of
   the fp32 model (every layer sees fp32 activations; Hessians cacheable across settings).
4. quipc.passes.methods.quantize_linear on each weight (inside step 3 when sequential), then
   each MatMul/Gemm is replaced by a QuipLinear node (ops='quip') or its standard-op body
   (ops='std'); MatMuls reading the same tensor whose layers share in_scale and input transform
   (q/k/v, gate/up) become one QuipLinearGroup node, placed where the first of them was. The
   result is written with external data and checked with onnx.checker (full check).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from quipc_runtime.layer import QuantizedLinear

from ..backends.onnx.emitter import accuracy_level_label
from ..backends.onnx.export import META_FILE, save_model
from ..config import QuantConfig
from ..passes.methods import LayerInput, quantize_linear
from .onnx_calib_cache import calib_key, read_cache, write_cache
from .onnx_calibration import calibration_windows, load_tokenizer, text_tokenizer
from .onnx_rewrite import replace_linears
from .onnx_targets import Target, find_targets, load_checked


# --- Hessians ---------------------------------------------------------------------------
def collect_hessians(model: onnx.ModelProto, model_path: Path, targets: list[Target], windows: torch.Tensor,
                     threads: int | None, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """E[x x^T] of each target's input from one onnxruntime pass of the original model,
    and the rank of each input (so that QuipLinear can use its shape-op-free 3-D body)."""
    from tqdm.auto import tqdm

    from quipc_runtime.onnx_runtime import OnnxLM

    from .onnx_sequential import lm_feeds

    xs = sorted({t.x for t in targets})
    calib = onnx.ModelProto()
    calib.CopyFrom(model)
    known = {o.name for o in calib.graph.output}
    for name in xs:
        if name not in known:
            calib.graph.output.append(helper.make_empty_tensor_value_info(name))
    tmp = Path(tempfile.mkdtemp(prefix="quipc_calib_"))
    try:
        path = tmp / "calib.onnx"
        onnx.save_model(calib, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="calib.onnx.data", size_threshold=1024)
        lm = OnnxLM(path, threads=threads, providers=["CPUExecutionProvider"])
        sums = {x: torch.zeros(0) for x in xs}
        ranks: dict[str, int] = {}
        for feeds in tqdm(lm_feeds(model, windows), desc="calibrate (onnxruntime)", unit="window",
                          disable=not progress):
            outs = lm.session.run(xs, feeds)
            for name, act in zip(xs, outs):
                ranks[name] = int(np.ndim(act))
                a = torch.from_numpy(np.asarray(act, dtype=np.float32).reshape(-1, act.shape[-1]))
                part = (a.T @ a).double()     # float32 product per window, float64 sum
                sums[name] = part if sums[name].numel() == 0 else sums[name] + part
        count = int(windows.numel())
        del lm
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: s / max(count, 1) for name, s in sums.items()}, ranks


# --- the entry point --------------------------------------------------------------------
CALIBRATION_MODES = ("sequential", "one-pass")


def compile_onnx(model: Path, out: Path, cfg: QuantConfig, calib, *, tokenizer: str | None,
                 ops: str = "quip", progress: bool = True, accuracy_level: int | None = 4,
                 threads: int | None = 2, hessian_cache: Path | None = None,
                 calibration: str = "sequential") -> dict:
    """Quantize an ONNX LM's MatMul/Gemm weights with QuIP; writes `out` (a .onnx file with
    `<name>.data` beside it, or a folder holding model.onnx) and returns a summary.

    calibration: "sequential" (each layer calibrated on the model whose earlier layers are
    quantized) or "one-pass" (all Hessians from the fp32 model). hessian_cache: a file that
    keeps, keyed by everything they depend on, the finished layers (sequential) or the
    Hessians (one-pass) for a later identical run."""
    t0 = time.time()
    cfg, calib = cfg.validate(), calib.validate()
    if ops not in ("quip", "std"):
        raise ValueError(f"unknown --onnx-ops {ops!r}: expected 'quip' or 'std'")
    if calibration not in CALIBRATION_MODES:
        raise ValueError(f"unknown calibration {calibration!r}: expected one of {CALIBRATION_MODES}")
    model_path, out = Path(model), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose another -o")
    if out.resolve() == model_path.resolve():
        raise ValueError("the output must not overwrite the input model")
    src = load_checked(model_path)
    targets, skipped = find_targets(src, cfg.quantize_lm_head)
    if not targets:
        why = ("; ".join(skipped[:5])) if skipped else "the graph has no MatMul or Gemm"
        raise ValueError(f"{model_path}: nothing to quantize (no MatMul/Gemm with a constant 2-D weight): {why}")
    if progress:
        print(f"{len(targets)} MatMul/Gemm layers to quantize, {len(skipped)} skipped")

    from tqdm.auto import tqdm

    tok = None
    ranks: dict[str, int] = {}
    layers: dict = {}
    caches: dict = {}
    calib_info: dict = {"source": "none (rtn needs no calibration)"}
    mode = "none (rtn needs no calibration)"

    left = Counter(t.x for t in targets)   # targets not quantized yet, per input

    def quantize(t: Target, h):
        inp = LayerInput(t.name, torch.from_numpy(t.weight), None if t.bias is None else torch.from_numpy(t.bias),
                         h, caches.setdefault(t.x, {}), last_reader=left[t.x] == 1)
        layer = quantize_linear(inp, cfg)
        left[t.x] -= 1
        if left[t.x] == 0:   # the input's last linear: free its shared stats (the rotated Hessian)
            del caches[t.x]
        return layer

    if cfg.method != "rtn" and calibration == "sequential":
        from .onnx_sequential import lm_feeds, plan_stages, run_sequential

        mode = (f"sequential: the graph cut before each of the {len(plan_stages(targets))} distinct target inputs, "
                "each calibrated (onnxruntime) on the outputs of the already-quantized earlier layers")
        key = None if hessian_cache is None else calib_key(
            model_path, calib, json.dumps(cfg.to_dict(), sort_keys=True), tokenizer, "sequential-layers")
        cached = read_cache(hessian_cache, key)
        if cached is not None:
            layers = {name: QuantizedLinear.from_storage(json.loads(meta), {k: v.numpy() for k, v in ts.items()})
                      for name, (meta, ts) in cached["layers"].items()}
            ranks, calib_info = cached["ranks"], dict(cached["info"], cached=True)
            tok = text_tokenizer(calib, tokenizer, model_path)
        else:
            windows, calib_info, tok = calibration_windows(src, model_path, calib, cfg, tokenizer, threads, progress)
            res = run_sequential(src, targets, lm_feeds(src, windows), int(windows.numel()), quantize,
                                 threads=threads, progress=progress)
            layers, ranks = res.layers, res.ranks
            write_cache(hessian_cache, {
                "key": key, "ranks": ranks, "info": calib_info,
                "layers": {n: (json.dumps(l.meta(), default=_jsonable), {k: torch.from_numpy(np.ascontiguousarray(v))
                                                                         for k, v in l.tensors().items()})
                           for n, l in layers.items()}})
    else:
        hess: dict[str, torch.Tensor] = {}
        if cfg.method != "rtn":
            mode = "one onnxruntime pass of the fp32 model (not sequential: every layer sees fp32 activations)"
            key = None if hessian_cache is None else calib_key(model_path, calib, f"seed={cfg.seed}", tokenizer,
                                                                "one-pass-hessians")
            cached = read_cache(hessian_cache, key)
            if cached is not None:
                hess, ranks, calib_info = cached["hessians"], cached["ranks"], dict(cached["info"], cached=True)
                tok = text_tokenizer(calib, tokenizer, model_path)
            else:
                windows, calib_info, tok = calibration_windows(src, model_path, calib, cfg, tokenizer, threads, progress)
                hess, ranks = collect_hessians(src, model_path, targets, windows, threads, progress)
                write_cache(hessian_cache, {"key": key, "hessians": hess, "ranks": ranks, "info": calib_info})
        elif calib.text is not None and tokenizer:
            tok = load_tokenizer(tokenizer)
        for t in tqdm(targets, desc="quantize", unit="layer", disable=not progress):
            layers[t.name] = quantize(t, hess.get(t.x))
            if left[t.x] == 0:
                hess.pop(t.x, None)   # (written to the cache already)
    new = replace_linears(src, targets, layers, ops, accuracy_level, ranks)

    weights = sum(l.out_features * l.in_features for l in layers.values())
    stored = sum(l.storage_bits() for l in layers.values())
    losses = [l.info.get("proxy_loss") for l in layers.values() if l.info.get("proxy_loss") is not None]
    summary = {"source": str(model_path), "ops": ops, "bits": cfg.bits, "method": cfg.method,
               "quantized_layers": len(layers), "quantized_weights": weights, "bpw": stored / max(weights, 1),
               "skipped": skipped, "calibration": calib_info,
               "calibration_mode": mode,
               "proxy_loss_mean": float(np.mean(losses)) if losses else None,
               "accuracy_level": accuracy_level_label(accuracy_level)}
    if out.suffix == ".onnx":
        path = _save_file(new, out)
    else:
        meta = dict(summary, format="quipc-onnx", version=1)
        path = save_model(new, out, meta, tokenizer=tok)
    summary["onnx"] = str(path)
    summary["seconds"] = time.time() - t0
    return summary


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _save_file(model: onnx.ModelProto, out: Path) -> Path:
    """out.onnx + out.onnx.data, written in a temporary folder, checked, then moved."""
    data = out.name + ".data"
    if (out.parent / data).exists():
        raise FileExistsError(f"{out.parent / data} already exists: choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        path = tmp / out.name
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        onnx.checker.check_model(str(path), full_check=True)
        os.replace(tmp / data, out.parent / data)
        os.replace(path, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["compile_onnx", "META_FILE"]
