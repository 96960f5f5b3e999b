"""`quipc compile MODEL --target onnx --graph traced`: the artifact's transformers model captured
by torch.export (backends/traced) and translated by the dynamo ONNX exporter, each quantized
linear one quipc node and each layer's attention (torch.ops.quipc.attention) the hand-written
graph's grouped-query arithmetic (placeholders.py), for every family in backends/traced/families.py.

The file has the hand-written graph's interface (export.io_convention): inputs `input_ids`
and `past_key_values.{i}.key/.value`, outputs `logits` and `present.{i}.key/.value`, so
`quipc_runtime.onnx_runtime.OnnxLM`, `quipc eval` and `quipc bench` run it unchanged.
"""
from __future__ import annotations

import time
from pathlib import Path

import onnx

from . import fusable
from .builder import OPSET
from .emitter import accuracy_level_label
from .export import IR_VERSION, MODEL_FILE, save_model
from .placeholders import lower_placeholders, translations


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids"] + past, ["logits"] + present


def _rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = mapping.get(v.name, v.name)


def _name_dims(graph: onnx.GraphProto) -> None:
    """Dynamic dimensions named as in the hand-written graph (batch, seq, past_seq)."""
    ids = graph.input[0].type.tensor_type.shape.dim
    past = graph.input[1].type.tensor_type.shape.dim if len(graph.input) > 1 else []
    names = {d.dim_param: n for d, n in ((ids[0], "batch"), (ids[1], "seq")) if d.dim_param}
    if len(past) > 2 and past[2].dim_param:
        names[past[2].dim_param] = "past_seq"
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]


def _to_onnx(captured) -> onnx.ModelProto:
    import torch

    try:
        program = torch.onnx.export(captured.program, captured.example, dynamo=True, opset_version=OPSET,
                                    custom_translation_table=translations(), verbose=False, optimize=True)
    except Exception as e:
        raise ValueError(f"{captured.family.name}: the ONNX exporter cannot translate the traced graph: "
                         f"{_first_cause(e)}") from e
    return program.model_proto


def _first_cause(e: BaseException) -> str:
    """The innermost message of a chained exporter error (names the op it failed on)."""
    lines = []
    while e is not None:
        text = str(e).strip()
        for line in text.splitlines():
            if "Error when translating node" in line or "No decomposition" in line or "not supported" in line:
                lines.append(line.strip())
        e = e.__cause__ or e.__context__
    return lines[0] if lines else "see the chained exception"


def _quantized_embeddings(artifact: Path, manifest: dict, layers: dict) -> dict:
    """name -> the quantized embedding's source; adds a quantized head to `layers`."""
    from quipc_runtime import artifact as art
    from quipc_runtime.embedding import EmbeddingTable

    head = None
    if manifest.get("head"):
        (head,) = art.load_block(artifact, manifest["head"])
        layers[manifest["head"]["module"]] = head
    emb = manifest.get("embedding") or {}
    if emb.get("kind") == "head":
        return {emb["module"]: head}
    if emb.get("kind") == "table":
        return {emb["module"]: EmbeddingTable.from_storage(emb, art.load_tensors(artifact, emb))}
    return {}


def export_traced(artifact: Path, out: Path, *, ops: str = "quip", progress: bool = True,
                  accuracy_level: int | None = 4) -> Path:
    """A quipc artifact of any family in backends/traced/families.py -> OUT/model.onnx."""
    from quipc_runtime import artifact as art

    from ..traced import capture

    artifact, out = Path(artifact), Path(out)
    t0 = time.time()
    if progress:
        print(f"tracing {artifact}")
    captured = capture(artifact, attention="op")   # placeholders.grouped_attention
    manifest = captured.manifest
    model = _to_onnx(captured)
    layers = art.load_layers(artifact, manifest)
    embeddings = _quantized_embeddings(artifact, manifest, layers)
    lower_placeholders(model, layers, embeddings, ops=ops, accuracy_level=accuracy_level)
    rewrites = fusable.rewrite(model)   # RMSNorm, rotate_half in fusable forms; shared Shape reads
    ins, outs = io_names(captured.cache.layers)
    mapping = dict(zip([v.name for v in model.graph.input], ins))
    mapping.update(zip([v.name for v in model.graph.output], outs))
    _rename_values(model.graph, mapping)
    _name_dims(model.graph)
    model.graph.name = f"quipc_traced_{captured.config.model_type}"
    model.ir_version = IR_VERSION
    model.producer_name = "quipc"
    del model.metadata_props[:]
    meta = {"format": "quipc-onnx", "version": 1, "graph": "traced", "family": captured.family.name,
            "model_type": captured.config.model_type, "source_artifact": str(artifact.resolve()),
            "ops": ops, "accuracy_level": accuracy_level_label(accuracy_level), "rewrites": rewrites,
            "bits": manifest.get("quant_config", {}).get("bits"),
            "code_format": sorted({la.format for la in layers.values()}),
            "bpw": manifest.get("summary", {}).get("bpw"), "quantized_layers": len(layers),
            "io": {"input_ids": "int64 (batch, seq)",
                   "past": "past_key_values.{i}.key/.value float32 (batch, kv_heads, past_seq, head_dim); "
                           "past_seq=0 for prefill",
                   "outputs": "logits (batch, seq, vocab), present.{i}.key/.value",
                   "layers": captured.cache.layers}}   # no timing in it: the same bytes every export
    tok = art.safe_path(artifact, manifest["tokenizer"]) if manifest.get("tokenizer") else None
    if progress:
        print(f"writing {out / MODEL_FILE} ({captured.family.name}, traced, {len(layers)} quantized layers, "
              f"ops={ops}; {time.time() - t0:.0f} s)")
    return save_model(model, out, meta, tokenizer_dir=tok if tok and tok.is_dir() else None)
