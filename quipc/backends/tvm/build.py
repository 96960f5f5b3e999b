"""`quipc compile MODEL --target tvm`: artifact -> Relax/TIR -> compiled library + parameters.

Output folder:
    model.so         the Relax VM executable (all kernels), built for `target`
    params.bin       the parameters (tvm.runtime.save_param_dict format), named p00000...
    tvm_config.json  functions, parameter order, model shape, target, runtime contract
    artifact_manifest.json  a copy of the artifact's manifest;  tokenizer/  its tokenizer
Loaded by `quipc_runtime.tvm_runtime` with the TVM runtime alone.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


CONFIG = "tvm_config.json"
LIB = "model.so"
PARAMS = "params.bin"
FORMAT_VERSION = 1


def resolve_target(target: str):
    """'llvm' means this CPU (its LLVM cpu name, so AVX2/AVX-512 are used); 'cuda' the GPU
    architecture given as cuda:sm_XX (default sm_80); anything else is passed to tvm.target.Target."""
    import tvm
    from tvm.target import codegen

    if target == "llvm":
        spec = {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": codegen.llvm_get_system_cpu()}
        off = features_the_host_lacks(codegen.llvm_get_cpu_features(tvm.target.Target(spec)))
        return tvm.target.Target({**spec, "mattr": [f"-{f}" for f in off]} if off else spec)
    if target == "cuda" or target.startswith("cuda:"):
        arch = target.split(":", 1)[1] if ":" in target else "sm_80"
        host = {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"}
        return tvm.target.Target({"kind": "cuda", "arch": arch, "host": host})
    if target.startswith("{"):
        return tvm.target.Target(json.loads(target))
    raise ValueError(f"unknown TVM target {target!r}: use llvm, cuda, cuda:sm_XX, or a JSON target dict")


# Vector instruction sets LLVM may emit that a CPU model implies but a virtual machine can hide
# (a hypervisor that masks AVX-512 still reports the CPU as, say, znver4).
_MASKABLE = ("avx512", "avxvnni", "gfni", "vaes", "vpclmulqdq", "amx")


def features_the_host_lacks(features, cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU model's vector features (LLVM names) that the host's /proc/cpuinfo does not
    list: code built with them would stop on an illegal instruction. Empty where there is no
    /proc/cpuinfo to read (the CPU model's features are then taken as they are)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return []
    have = {f.replace("_", "") for f in flags}
    return sorted(f for f in features if f.startswith(_MASKABLE) and f.replace("-", "") not in have)


def schedule(mod, target):
    import tvm

    if target.kind.name == "llvm":
        from .schedules import schedule_module

        return schedule_module(mod)
    from tvm.s_tir import dlight as dl

    import tvm.support.nvcc  # noqa: F401  registers the CUDA compile callback: kernels ship as binaries

    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)


def _tvm_or_explain():
    try:
        import tvm  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the TVM backend needs apache-tvm (pip install apache-tvm): {e}") from None


def compile_artifact(artifact: Path, out: Path, *, target: str = "llvm", progress: bool = True,
                     activations: str = "fp32") -> Path:
    _tvm_or_explain()
    import tvm
    from tvm.runtime import save_param_dict_to_file

    from quipc_runtime import artifact as art

    from .relax_model import ModelBuilder

    artifact, out = Path(artifact), Path(out)
    if not artifact.exists():
        raise FileNotFoundError(f"artifact {artifact} not found")
    manifest = art.read_manifest(artifact)
    from ..head_support import head_and_dense_embedding, model_config_for_dense
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if (out / CONFIG).exists() or (out / LIB).exists():
        raise FileExistsError(f"{out} already holds a TVM build: choose another -o")
    tgt = resolve_target(target)
    log = (lambda msg: print(f"[quipc tvm] {msg}", flush=True)) if progress else (lambda msg: None)
    t0 = time.time()
    log(f"loading {artifact}")
    layers = art.load_layers(artifact, manifest)
    dense = art.load_dense(artifact, manifest)
    from .embedding import shares_head

    # CPU builds decode a shared grid or e8p head's rows in the graph; CUDA builds keep the dense table
    decodes = shares_head if tgt.kind.name == "llvm" else (lambda head: False)
    embed_from_head = head_and_dense_embedding(artifact, manifest, layers, dense, head_decodes=decodes)
    from .gemv_i8 import use_int8

    int8 = use_int8(activations, tgt)
    builder = ModelBuilder(model_config_for_dense(manifest, dense, layers), layers, dense,
                           manifest.get("blocks_prefix", "model.layers"), embed_from_head=embed_from_head,
                           int8_activations=int8)
    mod = builder.build()
    log(f"relax module: {sum(1 for _ in mod.functions)} functions, {len(builder.arrays)} parameters; "
        f"scheduling for {tgt}")
    mod = schedule(mod, tgt)
    log("compiling (llvm/nvcc)")
    ex = tvm.compile(mod, target=tgt)
    sp = builder.spec
    cfg = {
        "format": "quipc-tvm", "format_version": FORMAT_VERSION,
        "target": str(tgt), "device": "cuda" if tgt.kind.name == "cuda" else "cpu",
        "functions": ["prefill_all", "prefill", "decode"],
        "params": [f"p{i:05d}" for i in range(len(builder.arrays))],
        "param_names": builder.names,
        "param_types": [[list(a.shape), str(a.dtype)] for a in builder.arrays],
        "model": {"layers": sp.layers, "heads": sp.heads, "kv_heads": sp.kv_heads,
                  "head_dim": sp.head_dim, "vocab": sp.vocab, "max_pos": sp.max_pos,
                  "hidden": sp.hidden},
        "row_multiple": 16, "cache_multiple": 16,
        "decode_span": True,   # decode takes the attended extent as a shape argument
        "bits": sorted({s.bits for s in builder.linear_specs.values()}),
        "formats": sorted({s.format for s in builder.linear_specs.values()}),
        "activations": "int8" if int8 else "fp32",
        "eos_token_id": manifest["model_config"].get("eos_token_id"),
        "source_artifact": str(artifact.resolve()),
        "compile_seconds": None,
    }

    def fill(tmp: Path) -> None:
        ex.export_library(str(tmp / LIB))
        save_param_dict_to_file({f"p{i:05d}": tvm.runtime.tensor(a) for i, a in enumerate(builder.arrays)},
                                str(tmp / PARAMS))

    write_build(out, artifact, manifest, cfg, t0, fill)
    log(f"wrote {out} in {time.time() - t0:.0f} s")
    return out


def write_build(out: Path, artifact: Path, manifest: dict, cfg: dict, t0: float, fill) -> None:
    """Write a TVM build into `out` through a temporary sibling folder: fill(tmp) writes the
    compiled library (and parameters), then come the artifact's manifest and tokenizer, and last
    the config, which marks the build complete. An error leaves nothing half-written in `out`
    (which may already hold the artifact: quipc compile MODEL --target tvm)."""
    from quipc_runtime import artifact as art

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        shutil.copy(artifact / art.MANIFEST, tmp / "artifact_manifest.json")
        tok = manifest.get("tokenizer")
        if tok and (artifact / tok).is_dir():
            shutil.copytree(artifact / tok, tmp / "tokenizer")
        cfg["compile_seconds"] = round(time.time() - t0, 1)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG):  # config last: marks done
            dest = out / item.name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            item.rename(dest)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
