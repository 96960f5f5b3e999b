"""Calibration tokens of the ONNX frontend (`quipc compile model.onnx`): token ids or text
(read with a tokenizer) cut into windows, or, data-free, windows the ONNX model samples
itself through onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto

from ..calibration_cache import ONNX_WRITERS, cached_windows, files_fingerprint, kept_message, part_key
from ..config import QuantConfig


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


def text_tokenizer(calib, tokenizer: str | None, model_path: Path):
    """The tokenizer a text calibration file was read with (saved beside a folder output)."""
    if calib.text is None or Path(calib.text).suffix in (".npy", ".ids"):
        return None
    spec = tokenizer
    if spec is None and (model_path.parent / "tokenizer").is_dir():
        spec = str(model_path.parent / "tokenizer")
    return load_tokenizer(spec) if spec else None


def calibration_windows(src, model_path: Path, calib, cfg: QuantConfig, tokenizer, threads, progress):
    from .calibration import cut_windows

    vocab = vocab_size(src)
    if calib.text is None:
        from tqdm.auto import tqdm

        from quipc_runtime.onnx_runtime import OnnxLM

        if vocab is None:
            raise ValueError("data-free calibration needs the vocabulary size (an embedding Gather); "
                             "pass --calib with text or token ids")
        def write() -> torch.Tensor:
            lm = OnnxLM(model_path, threads=threads, providers=["CPUExecutionProvider"])
            bar = tqdm(total=calib.windows, desc="generate calibration text", unit="window", disable=not progress)
            try:
                return generated_windows(lm, calib.windows, calib.length, vocab, cfg.seed, bar)
            finally:
                bar.close()

        windows, kept = cached_windows(_generated_key(src, model_path, calib, cfg, vocab, threads), calib.windows,
                                       write)
        if kept and progress:
            tqdm.write(kept_message("generate calibration text", calib.windows))
        return windows, {"source": "generated (onnxruntime, top-k 50)", "seed": cfg.seed,
                         "windows": calib.windows, "length": calib.length}, None
    tokens, tok = calibration_tokens(Path(calib.text), tokenizer, model_path)
    if tokens.numel() and (int(tokens.min()) < 0 or (vocab is not None and int(tokens.max()) >= vocab)):
        raise ValueError(f"calibration token ids must lie in [0, {vocab}): found {int(tokens.min())}..{int(tokens.max())}")
    windows = cut_windows(tokens, calib.windows, calib.length, str(calib.text))
    return windows, {"source": str(calib.text), "windows": int(windows.shape[0]), "length": calib.length}, tok


def _generated_key(src, model_path: Path, calib, cfg: QuantConfig, vocab: int, threads) -> str:
    """The calibration cache's key of the text an .onnx model writes (quipc/calibration_cache.py):
    the .onnx file and its external data files, the settings, onnxruntime's version."""
    import onnxruntime

    model_path = Path(model_path)
    data = sorted({e.value for t in src.graph.initializer for e in t.external_data if e.key == "location"})
    files = [model_path] + [model_path.parent / d for d in data if (model_path.parent / d).is_file()]
    settings = {"onnx_generated": True, "windows": calib.windows, "length": calib.length, "seed": cfg.seed,
                "vocab": int(vocab), "ort_threads": threads, "onnxruntime": onnxruntime.__version__}
    return part_key(files_fingerprint(files), settings, "cpu", writers=ONNX_WRITERS)


def embedding_tables(model) -> list[str]:
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


def vocab_size(model) -> int | None:
    inits = {i.name: i for i in model.graph.initializer}
    emb = embedding_tables(model)
    return int(inits[emb[0]].dims[0]) if emb else None
