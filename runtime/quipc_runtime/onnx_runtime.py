"""Run an exported ONNX causal LM with onnxruntime: logits for evaluation, greedy generation
with the KV cache. Works for quipc exports (QuipLinear functions run in stock onnxruntime)
and for the usual torch.onnx / optimum layouts (input_ids [+ attention_mask, position_ids]
[+ past_key_values.* inputs and present.* outputs]).

Tokenizer convention: a quipc ONNX folder holds `model.onnx` and `tokenizer/` beside it
(`OnnxLM.tokenizer()` loads it). Never imports the compiler (quipc).

Custom ops: by default the session registers quipc's onnxruntime custom-op library
(ort_custom_ops.py) when it is built, so QuipLinear / QuipLinearGroup nodes run as fused C++
kernels; `custom_ops=False` runs their ONNX function bodies (stock onnxruntime), True
requires the library.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxLM:
    """model: path to a .onnx file or to a folder holding model.onnx."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None,
                 providers: list[str] | None = None, optimization: str = "all",
                 custom_ops: bool | None = None, profile_prefix: str | None = None):
        import onnxruntime as ort

        from . import ort_custom_ops

        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found")
        self.path = path
        opts = ort.SessionOptions()
        opts.log_severity_level = 3   # errors only: graph optimizers' notes are not for users
        if profile_prefix:   # onnxruntime's profiler: session.end_profiling() returns the JSON's path
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile_prefix)
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                         "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        if custom_ops is None:   # the library when built and it runs every node's code format
            custom_ops = ort_custom_ops.available() and ort_custom_ops.runs(path)
        if custom_ops:
            ort_custom_ops.register(opts, threads)
        self.custom_ops = bool(custom_ops)   # whether quipc's kernels run the ai.quipc nodes
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or default_providers())
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {path}: {e}") from None
        self._inspect()

    # --- model interface --------------------------------------------------------------------
    def _inspect(self) -> None:
        ins = self.session.get_inputs()
        outs = [o.name for o in self.session.get_outputs()]
        names = [i.name for i in ins]
        self.ids_name = next((n for n in names if n in ("input_ids", "input", "ids")), names[0])
        self.mask_name = next((n for n in names if "attention_mask" in n), None)
        self.pos_name = next((n for n in names if "position_ids" in n), None)
        self.past = [i for i in ins if i.name not in (self.ids_name, self.mask_name, self.pos_name)]
        self.logits_name = "logits" if "logits" in outs else outs[0]
        presents = [o for o in outs if o != self.logits_name]
        self.present_for = {}
        for k, p in enumerate(self.past):
            guess = p.name.replace("past_key_values", "present").replace("past_", "present_")
            self.present_for[p.name] = guess if guess in presents else (presents[k] if k < len(presents) else None)
        self.has_cache = bool(self.past) and all(self.present_for.values())

    def _empty_past(self, batch: int) -> dict:
        feeds = {}
        for p in self.past:
            dims = list(p.shape)
            shape = [batch if k == 0 else (d if isinstance(d, int) and d > 0 else 0) for k, d in enumerate(dims)]
            feeds[p.name] = np.zeros(shape, _NP.get(p.type, np.float32))
        return feeds

    def _run(self, ids: np.ndarray, past: dict, past_len: int):
        feeds = {self.ids_name: ids.astype(np.int64), **past}
        b, t = ids.shape
        if self.mask_name:
            feeds[self.mask_name] = np.ones((b, past_len + t), np.int64)
        if self.pos_name:
            feeds[self.pos_name] = np.arange(past_len, past_len + t, dtype=np.int64)[None].repeat(b, 0)
        names = [self.logits_name] + ([self.present_for[p.name] for p in self.past] if self.has_cache else [])
        res = self.session.run(names, feeds)
        new_past = {p.name: r for p, r in zip(self.past, res[1:])} if self.has_cache else {}
        return res[0], new_past

    @staticmethod
    def _ids(ids) -> np.ndarray:
        arr = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[0] != 1 or arr.shape[1] < 1:
            raise ValueError(f"expected token ids of shape (L,) or (1, L), got {arr.shape}")
        return arr

    def logits(self, ids) -> np.ndarray:
        """(L, vocab) float32 logits for one sequence of L token ids (no cache)."""
        ids = self._ids(ids)
        out, _ = self._run(ids, self._empty_past(1), 0)
        return np.asarray(out[0], dtype=np.float32)

    __call__ = logits

    def prefill(self, ids):
        """(logits of the last position, cache) for a prompt."""
        ids = self._ids(ids)
        out, past = self._run(ids, self._empty_past(1), 0)
        return out[0, -1], past

    def decode(self, token: int, past: dict, past_len: int):
        out, past = self._run(np.array([[token]], np.int64), past, past_len)
        return out[0, -1], past

    def generate(self, ids, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with the KV cache; returns prompt + new tokens, shape (L + new,)."""
        ids = self._ids(ids)
        seq = list(ids[0])
        if max_new_tokens <= 0:
            return np.array(seq, np.int64)
        if not self.has_cache:  # no cache inputs: recompute the whole sequence each step
            for _ in range(max_new_tokens):
                nxt = int(np.argmax(self.logits(np.array(seq))[-1]))
                seq.append(nxt)
                if nxt == eos_token_id:
                    break
            return np.array(seq, np.int64)
        last, past = self.prefill(ids)
        for step in range(max_new_tokens):
            nxt = int(np.argmax(last))
            seq.append(nxt)
            if nxt == eos_token_id or step == max_new_tokens - 1:
                break
            last, past = self.decode(nxt, past, len(seq) - 1)
        return np.array(seq, np.int64)

    def tokenizer(self):
        """The tokenizer stored beside the model (folder `tokenizer/`)."""
        from transformers import AutoTokenizer

        folder = self.path.parent / "tokenizer"
        if not folder.is_dir():
            raise FileNotFoundError(f"no tokenizer beside {self.path} (expected folder {folder}); "
                                    "pass --tokenizer")
        return AutoTokenizer.from_pretrained(folder)
