"""The compile's fine-tuning stage: load the rounded (not yet complete) artifact, fine-tune its
continuous parameters against the unquantized model's logits, and write them back.

The codes are never touched. The new block and dense files get new names and one manifest
write switches to them, so an interruption at any point leaves a folder that `--resume`
finishes: before the switch the rounded files are intact, after it the fine-tuned ones.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quipc_runtime import artifact as art
from quipc_runtime.loader import load_model as load_artifact

from .distributed import SINGLE, Group, on_main
from .passes.finetune import finetune_e2e, held_out_windows

FT_SUFFIX = "_ft"


def run_finetune(out: Path, manifest: dict | None, teacher: torch.nn.Module, windows: torch.Tensor, cfg,
                 dense: dict, progress: bool = True, group: Group = SINGLE) -> dict | None:
    """teacher: the unquantized model, or what gives its logits on the calibration windows
    (passes/teacher.TeacherLogits). With several ranks every rank trains the same student on
    its share of each step's windows (passes/finetune._WindowSteps); rank 0, which holds the
    manifest and the folder, writes the result, the others return None."""
    ft = cfg.finetune_config()
    # every layer is written: the student loads from the folder (the other ranks from a copy)
    on_main(group, lambda: art.write_manifest(out, manifest), None)
    student = _load_student(out, group)
    student.config.use_cache = False            # whole-window forwards, as before: no KV cache
    loaded = student.quipc_manifest             # rank 0's manifest, on every rank
    names = [meta["name"] for rec in loaded["blocks"] for meta in rec["layers"]]
    head = loaded.get("head")
    tied = None
    if head:
        names.append(head["layers"][0]["name"])
        emb = loaded.get("embedding") or {}
        if emb.get("kind") == "head":
            tied = (emb["module"], names[-1])
    train_windows = windows.shape[0] - held_out_windows(ft, windows.shape[0])
    bar = tqdm(total=ft.epochs * max(train_windows, 0), desc="fine-tune (e2e)", unit="window",
               disable=not progress or not group.is_main)
    try:
        result = finetune_e2e(student, teacher, names, windows, ft, progress=bar, tied_embedding=tied,
                              group=group)
    finally:
        bar.close()
    if not group.is_main:
        return None
    tunables = result["tunables"]
    old_files = [rec["file"] for rec in manifest["blocks"]] + [manifest["dense"]["file"]]
    if head:
        old_files.append(head["file"])
        layer = tunables[names[-1]].apply_to(art.load_block(out, head)[0])
        rel = f"{Path(head['file']).stem}{FT_SUFFIX}.safetensors"
        rec = art.write_layers(out, rel, [layer])
        rec["layers"][0]["storage_bits"] = layer.storage_bits()
        manifest["head"] = {**rec, "module": head["module"], "tied": head["tied"]}
    blocks = []
    for rec in manifest["blocks"]:
        layers = [tunables[layer.name].apply_to(layer) for layer in art.load_block(out, rec)]
        rel = f"blocks/block_{rec['index']:04d}{FT_SUFFIX}.safetensors"
        new = {"index": rec["index"], **art.write_layers(out, rel, layers)}
        for meta, layer in zip(new["layers"], layers):
            meta["storage_bits"] = layer.storage_bits()
        blocks.append(new)
    dense = dict(dense)
    for name, value in result["norms"].items():
        if name in dense:
            dense[name] = value.to(dense[name].dtype)
    stem = Path(art.DENSE_FILE)
    manifest["dense"] = art.write_dense(out, dense, rel=f"{stem.stem}{FT_SUFFIX}{stem.suffix}")
    manifest["blocks"] = blocks
    manifest["finetune"] = result["record"]
    art.write_manifest(out, manifest)
    for rel in old_files:
        if rel not in {b["file"] for b in blocks} | {manifest["dense"]["file"], (manifest.get("head") or {}).get("file")}:
            (out / rel).unlink(missing_ok=True)
    return manifest


def _load_student(out: Path, group: Group):
    """The rounded artifact as a torch model on every rank: rank 0 reads its folder, the others
    a copy of it (rank 0 broadcasts the files: the ranks may not share a file system)."""
    files = group.broadcast_object(on_main(group, lambda: _student_files(out), None)) if group.world > 1 else None
    if group.is_main:
        return load_artifact(out, allow_incomplete=True)
    with tempfile.TemporaryDirectory(prefix="quipc-student-") as tmp:
        for rel, data in files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        del files
        return load_artifact(tmp, allow_incomplete=True)


def _student_files(out: Path) -> dict[str, bytes]:
    """What loading the student reads from the folder (all but the tokenizer), as bytes."""
    files = (f for f in sorted(out.rglob("*")) if f.is_file())
    return {rel.as_posix(): f.read_bytes() for f in files
            if (rel := f.relative_to(out)).parts[0] != "tokenizer" and not any(p.startswith(".") for p in rel.parts)}
