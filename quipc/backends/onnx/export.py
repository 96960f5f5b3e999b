"""`quipc compile MODEL --target onnx`: a quipc artifact (or an fp32 HF model) -> ONNX."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .builder import MS_DOMAIN, OPSET, Builder
from .llama import build_llama, dense_linear
from .emitter import QuipLinearEmitter

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "quipc_onnx.json"
TOKENIZER_DIR = "tokenizer"
ARTIFACT_DIR = "artifact"   # quipc compile MODEL --target onnx -o OUT: OUT/artifact, then OUT/model.onnx
IR_VERSION = 10   # function overloads need IR 10


def make_model(b: Builder, inputs, outputs, emitter: QuipLinearEmitter | None, name: str,
               extra_opsets=()) -> onnx.ModelProto:
    opsets = {"": OPSET}
    if emitter is not None:
        opsets.update({o.domain: o.version for o in emitter.opsets()})
    opsets.update(dict(extra_opsets))
    graph = helper.make_graph(b.nodes, name, inputs, outputs, list(b.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              functions=list(emitter.functions.values()) if emitter else [],
                              producer_name="quipc")
    model.ir_version = IR_VERSION
    return model


def save_model(model: onnx.ModelProto, folder: Path, meta: dict | None = None,
               tokenizer_dir: Path | None = None, tokenizer=None) -> Path:
    """Write folder/model.onnx + external data (+ tokenizer, metadata) atomically: built in a
    temporary sibling folder, fully checked, then renamed. Refuses an existing folder, unless
    it holds only the artifact `quipc compile MODEL --target onnx` just wrote (`artifact/`)."""
    folder = Path(folder)
    held = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if folder.exists() and (not folder.is_dir() or held - {ARTIFACT_DIR}):
        raise FileExistsError(f"{folder} already exists and is not empty: choose another -o")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        path = tmp / MODEL_FILE
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        onnx.checker.check_model(str(path), full_check=True)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        if meta is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if held:   # beside the artifact: move the files in, model.onnx last (marks done)
            for item in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_FILE):
                os.replace(item, folder / item.name)
            tmp.rmdir()
        else:
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / MODEL_FILE


class _Linears:
    """Linear callback for build_llama: QuipLinear for quantized layers, fp32 otherwise."""

    def __init__(self, layers: dict, dense: dict, emitter: QuipLinearEmitter):
        self.layers, self.emitter, self.dense_fn, self.dense = layers, emitter, dense_linear(dense), dense

    def has(self, name: str) -> bool:
        return name in self.layers or f"{name}.weight" in self.dense

    def __call__(self, b: Builder, x: str, name: str, out_name: str | None = None) -> str:
        if name in self.layers:
            return self.emitter.emit(x, self.layers[name], out_name=out_name, rank=3)  # (batch, seq, n)
        if f"{name}.weight" not in self.dense:
            raise ValueError(f"the artifact has neither a quantized layer nor a weight for {name}")
        return self.dense_fn(b, x, name, out_name)

    def group(self, b: Builder, x: str, names: list[str]) -> list[str]:
        """Layers that read x: one QuipLinearGroup node when all are quantized and share in_scale
        and input transform (the emitter checks), else one call each."""
        if all(n in self.layers for n in names):
            return self.emitter.emit_group(x, [self.layers[n] for n in names], rank=3)
        return [self(b, x, n) for n in names]


def _config(model_config: dict):
    from transformers import AutoConfig

    cfg = dict(model_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("the artifact's manifest has no model_type")
    return AutoConfig.for_model(model_type, **cfg)


def export_artifact(artifact: Path, out: Path, *, ops: str = "quip", progress: bool = True,
                    accuracy_level: int = 4) -> Path:
    """A quipc artifact folder -> OUT/model.onnx (+ model.onnx.data, tokenizer/, quipc_onnx.json).

    ops='quip': each quantized linear is one ai.quipc QuipLinear node, or q/k/v and gate/up one
    QuipLinearGroup node when they share in_scale and input transform (ONNX functions whose bodies
    use MatMulNBits where the shape allows, standard ops otherwise); ops='std': standard ops only.
    accuracy_level: MatMulNBits' accuracy_level (4: int8 activations, fastest on CPU; 0: fp32)."""
    from quipc_runtime import artifact as art

    artifact, out = Path(artifact), Path(out)
    if ops not in ("quip", "std"):
        raise ValueError(f"unknown --onnx-ops {ops!r}: expected 'quip' or 'std'")
    manifest = art.read_manifest(artifact)
    config = _config(manifest["model_config"])
    if config.model_type not in ("llama",):
        raise ValueError(f"ONNX export supports llama-architecture artifacts, not {config.model_type!r}")
    if progress:
        print(f"loading {artifact}")
    layers = art.load_layers(artifact, manifest)
    dense = {k: v.float().numpy() for k, v in art.load_dense(artifact, manifest).items()}
    embed_fn = _quantized_head_and_embedding(artifact, manifest, layers)
    b = Builder()
    emitter = QuipLinearEmitter(b, ops=ops, accuracy_level=accuracy_level)
    inputs, outputs = build_llama(config, dense, _Linears(layers, dense, emitter), b, embed_fn=embed_fn)
    model = make_model(b, inputs, outputs, emitter, "quipc_" + config.model_type)
    summary = manifest.get("summary", {})
    meta = {"format": "quipc-onnx", "version": 1, "source_artifact": str(artifact.resolve()),
            "ops": ops, "accuracy_level": accuracy_level, "bits": manifest.get("quant_config", {}).get("bits"),
            "code_format": sorted({la.format for la in layers.values()}),
            "bpw": summary.get("bpw"), "quantized_layers": len(layers), "io": io_convention(config)}
    tok = art.safe_path(artifact, manifest["tokenizer"]) if manifest.get("tokenizer") else None
    if progress:
        print(f"writing {out / MODEL_FILE} ({len(layers)} QuipLinear layers, ops={ops})")
    return save_model(model, out, meta, tokenizer_dir=tok if tok and tok.is_dir() else None)


def _quantized_head_and_embedding(artifact: Path, manifest: dict, layers: dict):
    """Add the quantized lm_head (if any) to `layers`; the quantized embedding's graph
    builder (embed_fn for build_llama), or None for a dense table."""
    from quipc_runtime import artifact as art
    from quipc_runtime.embedding import EmbeddingTable

    from .embedding import embedding_fn

    head = None
    if manifest.get("head"):
        (head,) = art.load_block(artifact, manifest["head"])
        layers[manifest["head"]["module"]] = head
    emb = manifest.get("embedding") or {}
    if emb.get("kind") in (None, "dense"):
        return None
    if emb.get("module") != "model.embed_tokens":
        raise ValueError(f"ONNX export: unexpected embedding module {emb.get('module')!r}")
    if emb["kind"] == "head":
        if head is None:
            raise ValueError("the embedding shares the head's codes, but the artifact has no head")
        return embedding_fn(head)
    if emb["kind"] == "table":
        return embedding_fn(EmbeddingTable.from_storage(emb, art.load_tensors(artifact, emb)))
    raise ValueError(f"ONNX export: unknown embedding kind {emb['kind']!r}")


def io_convention(config) -> dict:
    return {"input_ids": "int64 (batch, seq)",
            "past": "past_key_values.{i}.key/.value float32 (batch, kv_heads, past_seq, head_dim); past_seq=0 for prefill",
            "outputs": "logits (batch, seq, vocab), present.{i}.key/.value",
            "layers": int(config.num_hidden_layers)}


def export_hf_model(model, out: Path, tokenizer=None, max_positions: int | None = None) -> Path:
    """An fp32 transformers Llama model -> ONNX with the same graph layout (the fp32 reference)."""
    config = model.config
    dense = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    b = Builder()
    inputs, outputs = build_llama(config, dense, dense_linear(dense), b, max_positions=max_positions)
    onnx_model = make_model(b, inputs, outputs, None, "fp32_" + config.model_type)
    meta = {"format": "quipc-onnx", "version": 1, "ops": "fp32", "io": io_convention(config)}
    return save_model(onnx_model, Path(out), meta, tokenizer=tokenizer)


__all__ = ["export_artifact", "export_hf_model", "save_model", "MS_DOMAIN", "np"]
