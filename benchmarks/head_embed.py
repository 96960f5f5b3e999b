"""Size x perplexity of lm_head / embedding settings, the decoder blocks held fixed.

    python benchmarks/head_embed.py --artifact /work/artifacts/w2 --model smollm2-135m \\
        --calib wiki.valid.tokens --text wiki.test.raw --windows 16 \\
        --variants 32/32,4/head,3/head,4/8,4/4 --json benchmarks/results/head_embed_w2.json

--calib generated: the data-free windows `quipc compile` writes without --calib (the source model
generates them, seed 0; with --artifact they must hash to the manifest's calibration tokens, which
holds on the host kind that compiled it).

A variant is HEAD/EMBED[@OPT[@OPT]]: OPT a damping (0.1), greedy passes (g2), the head's code format
(grid, e8p, trellis) or its rows kept at 8 bits (r4096: the most frequent calibration tokens').

Loads ARTIFACT's quantized blocks once (torch reference path; without --artifact the source
model's fp32 blocks, so that a variant's cost is its head / embedding alone), takes lm_head's Hessian from the
final norm's outputs on the calibration windows (the fp32 embedding in front, as `quipc compile`
does), then for each HEAD/EMBED variant quantizes the head and the embedding as `quipc compile
--head-bits HEAD --embed-bits EMBED` would (quipc.passes.head), swaps them in and measures PROTOCOL
perplexity. Sizes: the artifact's files other than head / embedding / dense tables, plus the
variant's tensors (bytes as stored; the artifact's manifest counted as it is; safetensors headers
of the variant's files and the manifest's change not counted: a few hundred bytes). A variant is only an estimate of a compile; compile the chosen one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", help="the quantized blocks to hold fixed (default: the source model's fp32 "
                                         "blocks: the cost of the head / embedding alone)")
    ap.add_argument("--model", default="smollm2-135m", help="the artifact's source (fp32 head/embedding)")
    ap.add_argument("--calib", required=True, help="a text file, or 'generated' (the data-free windows)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--variants", default="32/32,4/head,3/head,4/8,4/4")
    ap.add_argument("--json")
    ap.add_argument("--hessian-cache", help="file for lm_head's Hessian (read if present, else written)")
    ap.add_argument("--calib-cache", help="with --calib generated: file for the generated windows (read if present, "
                                          "else written; checked against the artifact's tokens either way)")
    args = ap.parse_args()

    import quipc_runtime
    from quipc.config import QuantConfig
    from quipc.frontend import calibration
    from quipc.frontend.hf import load_model
    from quipc.frontend.models import resolve
    from quipc.frontend.trace import find_blocks
    from quipc.head_refit_stage import final_hidden_hessian
    from quipc_runtime import artifact as art

    src, tok = load_model(resolve(args.model))
    if args.artifact:
        folder = Path(args.artifact)
        manifest = art.read_manifest(folder)
        model = quipc_runtime.load(folder)
        base_cfg = QuantConfig(**{k: v for k, v in manifest["quant_config"].items()
                                  if k in {f.name for f in dataclasses.fields(QuantConfig)}})
    else:   # fp32 blocks: a second copy of the source, whose head / embedding the variants replace
        folder, manifest = None, None
        model, _ = load_model(resolve(args.model))
        base_cfg = QuantConfig(bits=2)
    e32, h32 = src.get_input_embeddings(), src.get_output_embeddings()
    model.set_submodule("model.embed_tokens", e32)
    model.set_submodule("lm_head", h32)

    t0 = time.time()
    windows = _calib_windows(args, src, tok, manifest, calibration)
    if args.hessian_cache and Path(args.hessian_cache).is_file():
        hess = torch.load(args.hessian_cache)
    else:
        hess = final_hidden_hessian(model, find_blocks(src)[0], windows, 8)   # what the compile's refit takes
        if args.hessian_cache:
            torch.save(hess, args.hessian_cache + ".tmp")
            Path(args.hessian_cache + ".tmp").rename(args.hessian_cache)
    print(f"head Hessian in {time.time() - t0:.0f} s", flush=True)
    _variants(args, folder, manifest, model, src, tok, base_cfg, hess, e32, h32, windows)


def _calib_windows(args, src, tok, manifest, calibration):
    if args.calib != "generated":
        return calibration.text_windows(tok, args.calib, args.calib_windows, args.calib_len)
    from quipc.calibration_stage import tokens_sha256

    if args.calib_cache and Path(args.calib_cache).is_file():
        windows = torch.load(args.calib_cache)
    else:
        print("generating the data-free calibration windows", flush=True)
        with torch.no_grad():
            windows = calibration.generated_windows(src, tok, args.calib_windows, args.calib_len, seed=0)
        if args.calib_cache:
            torch.save(windows, args.calib_cache)
    want = ((manifest or {}).get("calibration") or {}).get("tokens_sha256")
    if want and tokens_sha256(windows) != want:
        raise SystemExit("the generated windows differ from the artifact's calibration tokens (another host "
                         "kind or library version generates other text): its head would be measured on others")
    return windows


def _variants(args, folder, manifest, model, src, tok, base_cfg, hess, e32, h32, calib_tokens):
    from quipc.cli import head_format_choices
    from quipc.eval.perplexity import eval_windows, perplexity, torch_logits_fn
    from quipc.passes import head as headpass
    from quipc_runtime import artifact as art
    from quipc_runtime.embedding import QuantEmbedding
    from quipc_runtime.modules import QuipLinearRef

    if folder is None:   # fp32 blocks: their bytes as fp32 tensors
        other = 0
        dense_small = sum(4 * t.numel() for k, t in src.state_dict().items() if "embed" not in k and "lm_head" not in k)
    else:
        replaced = {(manifest.get(k) or {}).get("file") for k in ("head", "embedding", "dense")}   # as the manifest
        other = sum(art.safe_path(folder, r).stat().st_size for r in art.data_files(manifest)   # names them
                    if r not in replaced)
        other += (folder / "manifest.json").stat().st_size  # the artifact's: within a few hundred bytes
        dense_small = sum(t.numel() * t.element_size() for k, t in art.load_dense(folder, manifest).items()
                          if "embed" not in k and "lm_head" not in k)
    params = int(sum(p.numel() for p in src.parameters()))
    eval_w = eval_windows(tok, args.text, args.ctx, args.windows)
    results = []
    for variant in args.variants.split(","):
        hb, eb = variant.split("/")
        # "4/head@0.1": damp 0.1; "4/head@g2": 2 greedy passes; "4/head@trellis": the head's code format
        eb, *opts = eb.split("@")
        cfg = dataclasses.replace(base_cfg, head_bits=int(hb), embed_bits=eb, head_int8_rows=0,
                                  head_refit_damp=0.0).validate()
        for opt in opts:
            if opt in head_format_choices():
                cfg = dataclasses.replace(cfg, head_format=opt).validate()
            elif opt.startswith("g"):
                cfg = dataclasses.replace(cfg, greedy_passes=int(opt[1:]))
            elif opt.startswith("r"):
                cfg = dataclasses.replace(cfg, head_int8_rows=int(opt[1:])).validate()
            elif opt:
                cfg = dataclasses.replace(cfg, damp=float(opt))
        plan = headpass.plan_for(src, cfg)
        t1 = time.time()
        nbytes = other + dense_small
        if plan.head_quantized:
            layer = headpass.quantize_head(src, plan, hess, cfg, tokens=calib_tokens)
            model.set_submodule("lm_head", QuipLinearRef(layer))
            nbytes += layer.storage_bits() // 8
        else:
            model.set_submodule("lm_head", h32)
        if plan.embed_mode == "head":
            model.set_submodule("model.embed_tokens", QuantEmbedding(layer))
        elif plan.embed_mode == "table":
            table = headpass.embedding_table(src, plan)
            model.set_submodule("model.embed_tokens", QuantEmbedding(table))
            nbytes += table.storage_bits() // 8
        else:
            w = e32.weight.detach()
            emb = torch.nn.Embedding.from_pretrained(w.half().float() if plan.embed_bits == 16 else w)
            model.set_submodule("model.embed_tokens", emb)
            nbytes += w.numel() * plan.embed_bits // 8
        if not plan.head_quantized and not (plan.embed_mode == "dense" and plan.embed_bits == 32):
            nbytes += h32.weight.numel() * 4  # a tied model's dense head stored apart
        quant_s = time.time() - t1
        r = perplexity(torch_logits_fn(model), eval_w, progress=False)
        rec = {"variant": variant, "head_bits": plan.head_bits, "head_format": cfg.head_format,
               "head_int8_rows": cfg.head_int8_rows, "embed": plan.embed_mode,
               "embed_bits": plan.embed_bits, "est_bytes": int(nbytes), "est_MB": nbytes / 1e6,
               "bits_per_param": 8 * nbytes / params, "ppl": r["ppl"], "windows": r["windows"],
               "quantize_s": quant_s, "eval_s": r["seconds"]}
        if plan.head_quantized:
            rec["head_proxy_loss"], rec["head_proxy_loss_rtn"] = layer.info.get("proxy_loss"), layer.info.get("proxy_loss_rtn")
        results.append(rec)
        print(json.dumps(rec), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"artifact": folder.name if folder else "fp32 blocks",
                                               "quant_config": manifest["quant_config"] if manifest else None,
                                               "windows": args.windows, "results": results}, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
