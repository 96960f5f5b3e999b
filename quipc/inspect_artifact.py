"""`quipc inspect`: what an artifact holds, layer by layer, read from its manifest."""
from __future__ import annotations

from pathlib import Path

from quipc_runtime import artifact as art


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def layer_rows(manifest: dict) -> list[dict]:
    rows = []
    records = manifest["blocks"] + ([manifest["head"]] if manifest.get("head") else [])
    for block in records:
        for layer in block["layers"]:
            rows.append({
                "name": layer["name"], "shape": "x".join(map(str, layer["shape"])), "bits": layer["bits"],
                "format": layer.get("format", "grid"), "method": layer.get("method"), "transform": layer["in_transform"]["kind"],
                "loss_rtn": layer.get("proxy_loss_rtn"), "loss": layer.get("proxy_loss"),
                "mu_w": layer.get("mu_w"), "mu_w_after": layer.get("mu_w_after", layer.get("mu_w")),
                "mu_h": layer.get("mu_h"), "mu_h_after": layer.get("mu_h_after", layer.get("mu_h")),
                "bpw": layer["storage_bits"] / (layer["shape"][0] * layer["shape"][1])})
    return rows


def deployment_size(folder: str | Path, manifest: dict) -> dict:
    """What a user ships, measured on disk: every file but the tokenizer (PROTOCOL's model
    size), and whole-model bits per parameter when the manifest knows the parameter count."""
    folder = Path(folder)
    tok = manifest.get("tokenizer")
    skip = art.safe_path(folder, tok) if tok else None
    total = sum(p.stat().st_size for p in folder.resolve().rglob("*")
                if p.is_file() and not (skip is not None and (p == skip or skip in p.parents)))
    params = manifest.get("summary", {}).get("model_params")
    return {"bytes": total, "model_params": params,
            "bits_per_param": None if not params else 8 * total / params}


def _head_line(manifest: dict) -> str:
    head, emb = manifest.get("head"), manifest.get("embedding")
    parts = []
    if head:
        meta = head["layers"][0]
        parts.append(f"lm_head {meta['bits']}-bit ({meta['storage_bits'] / (meta['shape'][0] * meta['shape'][1]):.3f} bpw"
                     f"{', tied' if head.get('tied') else ''})")
    else:
        parts.append("lm_head dense")
    refit = manifest.get("head_refit")
    if refit:
        parts.append(f"lm_head quantized again after the e2e stage (damp {refit['damp']}, proxy loss "
                     f"{_fmt(refit.get('proxy_loss'))})")
    if not emb:
        parts.append("embedding dense")
    elif emb["kind"] == "head":
        parts.append("embedding = the lm_head's codes (one table)")
    elif emb["kind"] == "table":
        parts.append(f"embedding {emb['bits']}-bit table, group {emb['group']} ({emb['bpw']:.3f} bpw)")
    else:
        parts.append(f"embedding dense, {emb['bits']}-bit float")
    return "; ".join(parts)


def _block_finetune_line(manifest: dict) -> str | None:
    """Block fine-tuning's own loss: the held-out per-token relative squared error of each
    block's outputs against the fp block's, before its first round's tuning and after its
    last (mean over blocks)."""
    recs = [b["layers"][0]["block_finetune"] for b in manifest["blocks"] if "block_finetune" in b["layers"][0]]
    rounds = [r["held_out"] for r in recs if r["held_out"]]
    if not recs:
        return None
    first = [r[0][0] for r in rounds if r[0][0] is not None]
    last = [r[-1][1] if r[-1][2] else r[-1][0] for r in rounds]   # a round not kept restores its start
    last = [v for v in last if v is not None]
    if not first or not last:
        return f"block fine-tuning: {len(recs)} blocks, {sum(r['seconds'] for r in recs):.0f} s"
    return (f"block fine-tuning: {len(recs)} blocks, held-out relative error of a block's outputs (mean) "
            f"{sum(first) / len(first):.5f} after its first rounding -> {sum(last) / len(last):.5f} after "
            f"its last tuning; {sum(r['seconds'] for r in recs):.0f} s")


def _finetune_line(manifest: dict) -> str:
    """The proxy losses above are those of the rounding; fine-tuning then moves the continuous
    parameters, and its own loss (KL to the unquantized model) is reported before/after."""
    ft = manifest.get("finetune")
    if not ft:
        return "fine-tuning: none"
    kl = ft["holdout_kl"]
    return (f"fine-tuning: {ft['mode']}, held-out KL to the unquantized model {kl[0]:.4f} -> "
            f"{kl[ft['kept_epoch']]:.4f} (epoch {ft['kept_epoch']} of {len(kl) - 1} kept; "
            f"{ft['train_windows']} training windows, lr {ft['lr']}, {ft['seconds']:.0f} s)")


def render(folder: str | Path) -> str:
    folder = Path(folder)
    manifest = art.read_manifest(folder, allow_incomplete=True)
    lines = [f"{'layer':<34} {'shape':>10} {'bits':>4} {'format':>6} {'method':>6} {'transform':>9} "
             f"{'loss rtn':>9} {'loss':>9} {'muW':>6} {'muW rot':>7} {'muH':>6} {'muH rot':>7} {'bpw':>6}"]
    for r in layer_rows(manifest):
        lines.append(f"{r['name']:<34} {r['shape']:>10} {r['bits']:>4} {r['format']:>6} {r['method']:>6} {r['transform']:>9} "
                     f"{_fmt(r['loss_rtn']):>9} {_fmt(r['loss']):>9} {_fmt(r['mu_w'], '.1f'):>6} "
                     f"{_fmt(r['mu_w_after'], '.1f'):>7} {_fmt(r['mu_h'], '.1f'):>6} "
                     f"{_fmt(r['mu_h_after'], '.1f'):>7} {r['bpw']:>6.3f}")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    s = manifest.get("summary", {})
    lines.append("")
    lines.append(f"status: {'complete' if manifest.get('complete') else 'UNFINISHED (compile --resume)'}; "
                 f"source: {manifest['source']['spec']}; config: {manifest['quant_config']}")
    if s:
        lines.append(f"quantized: {s['quantized_layers']} layers, {s['quantized_weights']:,} weights, "
                     f"{s['bpw']:.3f} bpw ({s['quantized_bytes']:,} bytes); kept dense: "
                     f"{s['dense_params']:,} params ({', '.join(s['dense_dtypes'])})")
    lines.append(f"calibration: {manifest.get('calibration')}; files: {size:,} bytes on disk")
    lines.append(_head_line(manifest))
    block_line = _block_finetune_line(manifest)
    if block_line:
        lines.append(block_line)
    lines.append(_finetune_line(manifest))
    dep = deployment_size(folder, manifest)
    bpp = "" if dep["bits_per_param"] is None else \
        f", {dep['bits_per_param']:.3f} bits/param over {dep['model_params']:,} parameters"
    lines.append(f"whole model (without tokenizer): {dep['bytes']:,} bytes ({dep['bytes'] / 1e6:.2f} MB){bpp}")
    return "\n".join(lines)
