"""Writing an ONNX folder (save_model: model.onnx + external data, tokenizer, quipc_onnx.json,
checked, atomic) and the fp32 reference export of a transformers Llama (export_hf_model).
A quipc artifact is lowered by traced.export_traced (`quipc compile ART --target onnx`)."""
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


__all__ = ["export_hf_model", "save_model", "MS_DOMAIN", "np"]
