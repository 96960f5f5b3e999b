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
3. Hessians: one onnxruntime pass of the *fp32* model over all windows, exposing every
   target MatMul's input as an extra output; inputs shared by several layers (q/k/v, gate/up)
   are accumulated once. This is not block-sequential (the torch path re-calibrates each
   block on the outputs of the already-quantized blocks): an ONNX graph has no block
   structure to cut it at, so every layer sees fp32 activations.
4. quipc.passes.methods.quantize_linear on each weight, then each MatMul/Gemm is replaced by a
   QuipLinear node (ops='quip') or its standard-op body (ops='std'), written with external
   data, checked with onnx.checker (full check).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..backends.onnx.builder import Builder
from ..backends.onnx.export import IR_VERSION, META_FILE, save_model
from ..backends.onnx.quip_function import QuipLinearEmitter
from ..config import QuantConfig
from ..passes.methods import LayerInput, quantize_linear

MIN_OPSET = 13
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


# --- reading and checking the input -----------------------------------------------------
def load_checked(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{path} is not a readable ONNX model (not ONNX, or truncated): {e}") from None
    if not model.graph.node:
        raise ValueError(f"{path} is not an ONNX model with a graph (no nodes): not ONNX, or truncated")
    opset = {o.domain: o.version for o in model.opset_import}.get("", opset_default(model))
    if opset < MIN_OPSET:
        raise ValueError(f"{path} uses opset {opset}; quipc needs opset >= {MIN_OPSET} "
                         "(convert it with onnx.version_converter or re-export it)")
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            data = path.parent / info.get("location", "")
            if not data.is_file():
                raise FileNotFoundError(f"{path}: external data file {data} (tensor {init.name}) is missing")
            need = int(info.get("offset", 0)) + int(info.get("length", 0))
            if data.stat().st_size < need:
                raise ValueError(f"{path}: external data file {data} is truncated "
                                 f"(tensor {init.name} needs {need} bytes, file has {data.stat().st_size})")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model if model.ByteSize() < 2 ** 31 - 1 else str(path))
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:
        raise ValueError(f"{path} fails onnx.checker: {e}") from None
    return model


def opset_default(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class Target:
    """One MatMul/Gemm with a constant weight: y = x W^T (+ bias)."""

    def __init__(self, node, index, weight, bias, weight_names, name):
        self.node, self.index, self.weight, self.bias = node, index, weight, bias
        self.weight_names, self.name = weight_names, name

    @property
    def x(self) -> str:
        return self.node.input[0]


def find_targets(model: onnx.ModelProto, quantize_lm_head: bool = False) -> tuple[list[Target], list[str]]:
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gathered = set(_embeddings(model))
    vocab = {int(inits[e].dims[0]) for e in gathered if len(inits[e].dims) == 2}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def const_weight(name: str):
        """(array, names it depends on, transposed?) for an initializer, maybe behind a Transpose."""
        if name in inits:
            return numpy_helper.to_array(inits[name]), [name], False
        if name in const_nodes:
            attr = {a.name: a for a in const_nodes[name].attribute}
            if "value" in attr:
                return numpy_helper.to_array(attr["value"].t), [], False
        prod = producers.get(name)
        if prod is not None and prod.op_type == "Transpose" and prod.input[0] in inits:
            perm = [a.ints for a in prod.attribute if a.name == "perm"]
            if not perm or list(perm[0]) == [1, 0]:
                return numpy_helper.to_array(inits[prod.input[0]]), [prod.input[0]], True
        return None, [], False

    targets, skipped, seen_names = [], [], set()
    for idx, node in enumerate(g.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        arr, deps, transposed = const_weight(node.input[1])
        label = node.name or node.output[0]
        if arr is None:
            skipped.append(f"{label}: weight is not constant")
            continue
        if arr.ndim != 2 or arr.dtype not in (np.float32, np.float16, np.float64) and str(arr.dtype) != "bfloat16":
            skipped.append(f"{label}: weight is not a 2-D float matrix")
            continue
        bias = None
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                skipped.append(f"{label}: Gemm with transA or alpha != 1")
                continue
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] not in inits or attrs.get("beta", 1.0) != 1.0:
                    skipped.append(f"{label}: Gemm bias is not a constant")
                    continue
                bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
            trans_b = bool(attrs.get("transB", 0))
        else:
            trans_b = False
        # weight as (out, in): MatMul's B is (in, out)
        w = arr if (trans_b != transposed) else arr.T
        if bias is not None and bias.shape[0] != w.shape[0]:
            skipped.append(f"{label}: bias does not match the output size")
            continue
        tied = any(d in gathered for d in deps)
        if (tied or w.shape[0] in vocab) and not quantize_lm_head:
            skipped.append(f"{label}: output projection onto the vocabulary (lm_head) kept in float")
            continue
        name = _layer_name(deps[0] if deps else label)
        while name in seen_names:
            name += "_"
        seen_names.add(name)
        targets.append(Target(node, idx, np.ascontiguousarray(w, dtype=np.float32), bias, deps, name))
    return targets, skipped


def _layer_name(weight_name: str) -> str:
    for suffix in (".weight_t", ".weight", "_weight"):
        if weight_name.endswith(suffix):
            return weight_name[: -len(suffix)]
    return weight_name


# --- calibration tokens -----------------------------------------------------------------
def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from .models import resolve

    src = resolve(spec) if not Path(spec).is_dir() else None
    try:
        if src is not None:
            kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
            return AutoTokenizer.from_pretrained(src.folder, **kwargs)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load a tokenizer from {spec}: {e}") from None


def calibration_tokens(path: Path, tokenizer_spec: str | None, model_path: Path):
    """1-D int64 token ids from .npy / .ids / text; returns (tokens, tokenizer or None)."""
    from .calibration import tokenize_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path} is not a readable .npy array: {e}") from None
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path} holds {arr.dtype}, not integer token ids")
        return torch.from_numpy(arr.reshape(-1).astype(np.int64)), None
    if path.suffix == ".ids":
        try:
            return torch.tensor([int(t) for t in path.read_text().split()], dtype=torch.long), None
        except ValueError:
            raise ValueError(f"{path} (.ids) must hold integer token ids separated by whitespace") from None
    spec = tokenizer_spec
    if spec is None and (model_path.parent / "tokenizer").is_dir():
        spec = str(model_path.parent / "tokenizer")
    if spec is None:
        raise ValueError(f"calibration text {path} needs a tokenizer: pass --tokenizer (a model folder, a "
                         ".gguf file or an alias), or give token ids as .npy / .ids (whitespace-separated)")
    tok = load_tokenizer(spec)
    return tokenize_file(tok, path), tok


def generated_windows(lm, n_windows: int, length: int, vocab: int, seed: int, progress=None) -> torch.Tensor:
    """Data-free calibration: windows sampled from the ONNX model itself (temperature 1,
    top-k 50), each started from a random token."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_windows):
        seq = [int(rng.integers(0, vocab))]
        last, past = lm.prefill(np.array(seq))
        while len(seq) < length:
            top = np.argpartition(-last, 50)[:50]
            p = np.exp(last[top] - last[top].max())
            seq.append(int(top[rng.choice(50, p=p / p.sum())]))
            if len(seq) < length:
                if lm.has_cache:
                    last, past = lm.decode(seq[-1], past, len(seq) - 1)
                else:
                    last = lm.logits(np.array(seq))[-1]
        out.append(seq)
        if progress is not None:
            progress.update(1)
    return torch.tensor(out, dtype=torch.long)


# --- Hessians ---------------------------------------------------------------------------
def collect_hessians(model: onnx.ModelProto, model_path: Path, targets: list[Target], windows: torch.Tensor,
                     threads: int | None, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """E[x x^T] of each target's input from one onnxruntime pass of the original model,
    and the rank of each input (so that QuipLinear can use its shape-op-free 3-D body)."""
    from tqdm.auto import tqdm

    from quipc_runtime.onnx_runtime import OnnxLM

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
        count = 0
        feeds_past = lm._empty_past(1)
        for ids in tqdm(windows, desc="calibrate (onnxruntime)", unit="window", disable=not progress):
            arr = ids[None].numpy()
            feeds = {lm.ids_name: arr, **feeds_past}
            if lm.mask_name:
                feeds[lm.mask_name] = np.ones_like(arr)
            if lm.pos_name:
                feeds[lm.pos_name] = np.arange(arr.shape[1], dtype=np.int64)[None]
            outs = lm.session.run(xs, feeds)
            for name, act in zip(xs, outs):
                ranks[name] = int(np.ndim(act))
                a = torch.from_numpy(np.asarray(act, dtype=np.float32).reshape(-1, act.shape[-1]))
                part = (a.T @ a).double()     # float32 product per window, float64 sum
                sums[name] = part if sums[name].numel() == 0 else sums[name] + part
            count += int(arr.size)
        del lm
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: s / max(count, 1) for name, s in sums.items()}, ranks


# --- rewriting ----------------------------------------------------------------------------
def replace_linears(model: onnx.ModelProto, targets: list[Target], layers: dict, ops: str,
                    accuracy_level: int, ranks: dict | None = None) -> onnx.ModelProto:
    g = model.graph
    opset = opset_default(model)
    b = Builder(prefix="quipc/", opset=opset)
    emitter = QuipLinearEmitter(b, ops=ops, accuracy_level=accuracy_level, opset=opset)
    elem = _value_types(model)
    by_index = {t.index: t for t in targets}
    new_nodes = []
    for idx, node in enumerate(g.node):
        t = by_index.get(idx)
        if t is None:
            new_nodes.append(node)
            continue
        start = len(b.nodes)
        x, out = t.x, node.output[0]
        half = elem.get(x, TensorProto.FLOAT) != TensorProto.FLOAT
        if half:
            x = b.op("Cast", x, to=TensorProto.FLOAT)
        y = emitter.emit(x, layers[t.name], out_name=None if half else out, rank=(ranks or {}).get(t.x))
        if half:
            b.op("Cast", y, to=elem[t.x], out_name=out)
        new_nodes.extend(b.nodes[start:])
    used = {i for n in new_nodes for i in n.input}
    used |= {i for f in model.functions for n in f.node for i in n.input}
    dropped = {d for t in targets for d in t.weight_names} | {t.node.input[2] for t in targets
                                                              if t.node.op_type == "Gemm" and len(t.node.input) > 2}
    # Transposes feeding a replaced MatMul are now dead: drop nodes whose outputs are unused
    keep_nodes = _prune(new_nodes, {o.name for o in g.output})
    used = {i for n in keep_nodes for i in n.input}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep_nodes)
    inits = [i for i in model.graph.initializer if not (i.name in dropped and i.name not in used)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits + list(b.initializers.values()))
    names = {i.name for i in inits}
    graph_inputs = [i for i in model.graph.input if not (i.name in dropped and i.name not in names)]
    del out.graph.input[:]
    out.graph.input.extend(graph_inputs)
    have = {(o.domain, o.version) for o in out.opset_import}
    for o in emitter.opsets():
        if o.domain and all(d != o.domain for d, _ in have):
            out.opset_import.append(o)
    out.functions.extend(emitter.functions.values())
    out.ir_version = max(out.ir_version, IR_VERSION)
    return out


def _prune(nodes, graph_outputs: set) -> list:
    needed = set(graph_outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return list(reversed(keep))


def _value_types(model) -> dict:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    if not all(t == TensorProto.FLOAT for t in types.values()):
        try:  # need the element type of every MatMul input: infer shapes once
            inferred = onnx.shape_inference.infer_shapes(model)
            types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
        except Exception:
            pass
    return types


# --- the entry point --------------------------------------------------------------------
def compile_onnx(model: Path, out: Path, cfg: QuantConfig, calib, *, tokenizer: str | None,
                 ops: str = "quip", progress: bool = True, accuracy_level: int = 4,
                 threads: int | None = 2, hessian_cache: Path | None = None) -> dict:
    """Quantize an ONNX LM's MatMul/Gemm weights with QuIP; writes `out` (a .onnx file with
    `<name>.data` beside it, or a folder holding model.onnx) and returns a summary."""
    t0 = time.time()
    cfg, calib = cfg.validate(), calib.validate()
    if ops not in ("quip", "std"):
        raise ValueError(f"unknown --onnx-ops {ops!r}: expected 'quip' or 'std'")
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

    tok = None
    hess: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    calib_info: dict = {"source": "none (rtn needs no calibration)"}
    if cfg.method != "rtn":
        key = _calib_key(model_path, calib, cfg)
        if hessian_cache is not None and Path(hessian_cache).is_file():
            blob = torch.load(hessian_cache, weights_only=True)
            if blob.get("key") == key:
                hess, ranks, calib_info = blob["hessians"], blob["ranks"], dict(blob["info"], cached=True)
        if not hess:
            windows, calib_info, tok = _windows(src, model_path, calib, cfg, tokenizer, threads, progress)
            hess, ranks = collect_hessians(src, model_path, targets, windows, threads, progress)
            if hessian_cache is not None:
                torch.save({"key": key, "hessians": hess, "ranks": ranks, "info": calib_info}, hessian_cache)
    elif calib.text is not None and tokenizer:
        tok = load_tokenizer(tokenizer)

    from tqdm.auto import tqdm

    layers, caches = {}, {}
    for t in tqdm(targets, desc="quantize", unit="layer", disable=not progress):
        h = hess.get(t.x)
        inp = LayerInput(t.name, torch.from_numpy(t.weight), None if t.bias is None else torch.from_numpy(t.bias),
                         h, caches.setdefault(t.x, {}))
        layers[t.name] = quantize_linear(inp, cfg)
    new = replace_linears(src, targets, layers, ops, accuracy_level, ranks)

    weights = sum(l.out_features * l.in_features for l in layers.values())
    stored = sum(l.storage_bits() for l in layers.values())
    losses = [l.info.get("proxy_loss") for l in layers.values() if l.info.get("proxy_loss") is not None]
    summary = {"source": str(model_path), "ops": ops, "bits": cfg.bits, "method": cfg.method,
               "quantized_layers": len(layers), "quantized_weights": weights, "bpw": stored / max(weights, 1),
               "skipped": skipped, "calibration": calib_info,
               "calibration_mode": "one onnxruntime pass of the fp32 model (not block-sequential)",
               "proxy_loss_mean": float(np.mean(losses)) if losses else None,
               "accuracy_level": accuracy_level}
    if out.suffix == ".onnx":
        path = _save_file(new, out)
    else:
        meta = dict(summary, format="quipc-onnx", version=1)
        path = save_model(new, out, meta, tokenizer=tok)
    summary["onnx"] = str(path)
    summary["seconds"] = time.time() - t0
    return summary


def _calib_key(model_path: Path, calib, cfg: QuantConfig) -> str:
    st = model_path.stat()
    blob = f"{model_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{calib.text}|{calib.windows}|{calib.length}|{cfg.seed}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _windows(src, model_path: Path, calib, cfg: QuantConfig, tokenizer, threads, progress):
    from .calibration import cut_windows

    vocab = _vocab_size(src)
    if calib.text is None:
        from tqdm.auto import tqdm

        from quipc_runtime.onnx_runtime import OnnxLM

        if vocab is None:
            raise ValueError("data-free calibration needs the vocabulary size (an embedding Gather); "
                             "pass --calib with text or token ids")
        lm = OnnxLM(model_path, threads=threads, providers=["CPUExecutionProvider"])
        bar = tqdm(total=calib.windows, desc="generate calibration text", unit="window", disable=not progress)
        try:
            windows = generated_windows(lm, calib.windows, calib.length, vocab, cfg.seed, bar)
        finally:
            bar.close()
        return windows, {"source": "generated (onnxruntime, top-k 50)", "seed": cfg.seed,
                         "windows": calib.windows, "length": calib.length}, None
    tokens, tok = calibration_tokens(Path(calib.text), tokenizer, model_path)
    if tokens.numel() and (int(tokens.min()) < 0 or (vocab is not None and int(tokens.max()) >= vocab)):
        raise ValueError(f"calibration token ids must lie in [0, {vocab}): found {int(tokens.min())}..{int(tokens.max())}")
    windows = cut_windows(tokens, calib.windows, calib.length, str(calib.text))
    return windows, {"source": str(calib.text), "windows": int(windows.shape[0]), "length": calib.length}, tok


def _embeddings(model) -> list[str]:
    """Initializers gathered by the token ids (a graph input): the embedding tables."""
    inits = {i.name: i for i in model.graph.initializer}
    ids = {i.name for i in model.graph.input if i.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)
           and i.name not in inits}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            src = n.input[1]
            while src in producers and producers[src].op_type in ("Cast", "Identity", "Reshape", "Unsqueeze"):
                src = producers[src].input[0]
            if src in ids:
                out.append(n.input[0])
    return out


def _vocab_size(model) -> int | None:
    inits = {i.name: i for i in model.graph.initializer}
    emb = _embeddings(model)
    return int(inits[emb[0]].dims[0]) if emb else None


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
