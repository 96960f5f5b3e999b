"""Sequential (GPTQ-style) calibration of an ONNX graph: every quantized layer is calibrated
on the activations of the model whose earlier layers are already quantized.

Generic for any graph (no block names): the *stages* are the distinct inputs x_0, x_1, ... of
the target MatMul/Gemm nodes (layers reading one tensor, q/k/v or gate/up, share a stage), in
the order of the first target node reading each (ONNX node lists are topologically sorted).
The graph is cut before each stage's first target node (cut c_j); segment j holds the nodes
[c_j, c_{j+1}), a prefix segment the nodes [0, c_0). Each segment becomes a small ONNX model
of its own (its nodes, the initializers they read, the model's opsets and functions) whose
inputs are the *boundary* tensors it reads (produced before its cut, graph inputs included)
and whose outputs are the boundary tensors needed after the next cut. Values of Constant
nodes are not carried: the Constant node is copied into every segment that reads it.

For each window the boundary values are kept between segments (only those still needed), so:
1. run the prefix on all calibration windows;
2. stage j: H_j = E[x_j x_j^T] over all windows (float32 product per window, float64 sum,
   divided by the token count: as the one-pass calibration); quantize every target reading
   x_j; its node then reads the layer's effective weight (what the stored layer computes) in
   place of its weight, in whichever segment it lies;
3. run segment j on all windows with those weights: the boundary of cut c_{j+1}, x_{j+1}
   included. The segment after the last cut is never run.
Cost: about one forward of the model over the windows, plus one quantization per layer;
memory: the boundary values of all windows at one cut (for a Llama: the residual stream and
the stage input, a few small tensors), besides the model.

run_sequential(group=k) quantizes k consecutive stages at a time, all calibrated with the
earlier groups quantized (k = the stages of one decoder block: the torch path's block-by-block
calibration; on SmolLM2 at 3 bits its block-0 codes equal that path's, block 1's agree at
95-99 %, later ones drift apart as onnxruntime's and torch's float rounding flips rounding
decisions). compile_onnx uses k = 1.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .onnx_segments import Segmenter

_MAX_PROTO = 2 ** 31 - 1 - (64 << 20)   # segments larger than this go through a file with external data


# --- stages ---------------------------------------------------------------------------------
@dataclass
class Stage:
    x: str                       # the tensor its targets read
    cut: int                     # index of the first target node reading x
    targets: list = field(default_factory=list)


def plan_stages(targets) -> list[Stage]:
    """Distinct target inputs in the order of their first target node."""
    stages: dict[str, Stage] = {}
    for t in sorted(targets, key=lambda t: t.index):
        stages.setdefault(t.x, Stage(t.x, t.index)).targets.append(t)
    return list(stages.values())


def effective_initializer(model: onnx.ModelProto, target, weight: np.ndarray, name: str) -> TensorProto:
    """An initializer holding what the target node's B input evaluates to when the layer's
    weight (out, in) is `weight`: MatMul W^T; Gemm W if transB else W^T; in the original
    weight's dtype."""
    node = target.node
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    value = np.asarray(weight, dtype=np.float32)
    value = np.ascontiguousarray(value if trans_b else value.T)
    dtype = _b_elem_type(model, node.input[1])
    if dtype == TensorProto.BFLOAT16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, value.shape, value.ravel().tolist())
    return numpy_helper.from_array(value.astype(helper.tensor_dtype_to_np_dtype(dtype)), name)


def _b_elem_type(model: onnx.ModelProto, name: str) -> int:
    g = model.graph
    for i in g.initializer:
        if i.name == name:
            return i.data_type
    for n in g.node:
        if name in n.output:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        return a.t.data_type
            if n.op_type == "Transpose":
                return _b_elem_type(model, n.input[0])
    return TensorProto.FLOAT


# --- running ------------------------------------------------------------------------------
class _Runner:
    """onnxruntime sessions of segment models (in memory; through a file when too large)."""

    def __init__(self, threads: int | None):
        import onnxruntime as ort

        self.ort = ort
        self.opts = ort.SessionOptions()
        self.opts.log_severity_level = 3
        if threads:
            self.opts.intra_op_num_threads = int(threads)
            self.opts.inter_op_num_threads = 1
        self.tmp: tempfile.TemporaryDirectory | None = None

    def session(self, model: onnx.ModelProto, what: str):
        try:
            if model.ByteSize() < _MAX_PROTO:
                return self.ort.InferenceSession(model.SerializeToString(), self.opts,
                                                 providers=["CPUExecutionProvider"])
            if self.tmp is None:
                self.tmp = tempfile.TemporaryDirectory(prefix="quipc_segment_")
            path = Path(self.tmp.name) / "segment.onnx"
            for p in Path(self.tmp.name).iterdir():
                p.unlink()
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="segment.onnx.data", size_threshold=1024)
            return self.ort.InferenceSession(str(path), self.opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {what}: {e}") from None

    def close(self):
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _elem_type(value, name: str) -> int:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"sequential calibration carries tensor values only, but {name} is a "
                         f"{type(value).__name__} (a sequence or map); use the one-pass calibration")
    return helper.np_dtype_to_tensor_dtype(value.dtype)


@dataclass
class SequentialResult:
    layers: dict                 # target name -> QuantizedLinear (empty without a quantize function)
    ranks: dict                  # stage input name -> rank of its values
    outputs: list | None = None  # per window: {name: value} of `final_outputs`, when asked


def run_sequential(model: onnx.ModelProto, targets, feeds: list[dict], tokens: int,
                   quantize: Callable | None, *, threads: int | None = None, progress: bool = False,
                   on_hessian: Callable[[str, torch.Tensor], None] | None = None,
                   final_outputs: list[str] | None = None, group: int = 1) -> SequentialResult:
    """Stage by stage: H of each stage input over all windows (`feeds`: the graph inputs of
    each window; `tokens`: the token count H is divided by), then `quantize(target, H)` ->
    QuantizedLinear for each of its targets (their nodes then read the effective weights),
    then the stage's segment. quantize=None: no quantization, the fp32 model's Hessians.
    final_outputs: also run the last segment to the end and return these values per window.
    group > 1: stages are quantized `group` at a time, each group calibrated on the model with
    the earlier groups quantized and its own layers not (runs the group's segments twice): with
    the stages of one decoder block per group (4 for Llama), the torch path's block-by-block
    calibration."""
    from tqdm.auto import tqdm

    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if not feeds:
        raise ValueError("sequential calibration needs at least one calibration window")
    stages = plan_stages(targets)
    seg = Segmenter(model, tuple(final_outputs or ()))
    for st in stages:
        if not seg.carried(st.x):
            raise ValueError(f"target input {st.x} is a constant (initializer or Constant node), not an activation: "
                             "nothing to calibrate")
    runner = _Runner(threads)
    subs: dict[int, TensorProto] = {}
    layers, ranks = {}, {}
    carried: dict[str, list] = {}      # boundary values, one per window

    def value(name, w):
        return carried[name][w] if name in carried else feeds[w][name]

    def run(start, end, outputs, what):
        sources = [r for r in sorted(seg.segment_reads(start, end)) if seg.carried(r)]
        types = {}
        for r in sources:
            if r in carried or r in feeds[0]:
                types[r] = _elem_type(value(r, 0), r)
        sess = runner.session(seg.build(start, end, outputs, types, subs), what)
        names = [i.name for i in sess.get_inputs()]
        results = {o: [] for o in outputs}
        for w in range(len(feeds)):
            try:
                res = sess.run(outputs, {n: value(n, w) for n in names})
            except Exception as e:
                raise ValueError(f"onnxruntime failed on {what} (nodes {start}..{end - 1}), calibration "
                                 f"window {w}: {e}") from None
            for o, r in zip(outputs, res):
                results[o].append(r)
        del sess
        return results

    def advance(start, end, what):
        """Run nodes [start, end) and keep exactly the boundary of cut `end`."""
        nonlocal carried
        keep = [n for n in seg.boundary(end) if n not in seg.graph_inputs]
        outs = [n for n in keep if n not in carried]
        new = run(start, end, outs, what) if end > start and outs else {}
        carried = {n: carried[n] if n in carried else new[n] for n in keep}

    bar = tqdm(total=len(stages), desc="calibrate + quantize (sequential)", unit="stage", disable=not progress)
    try:
        advance(0, stages[0].cut, "the prefix segment")

        def seg_name(j):
            return f"segment {j + 1} of {len(stages)} (stage input {stages[j].x})"

        for g0 in range(0, len(stages), group):
            g1 = min(g0 + group, len(stages))
            at_start, pending = carried, {}
            for j in range(g0, g1):
                st = stages[j]
                h, rank = _hessian([value(st.x, w) for w in range(len(feeds))], tokens, st.x)
                ranks[st.x] = rank
                if on_hessian is not None:
                    on_hessian(st.x, h)
                if quantize is not None:
                    for t in st.targets:
                        layer = quantize(t, h)
                        layers[t.name] = layer
                        pending[t.index] = effective_initializer(model, t, layer.effective_weight(),
                                                                 f"quipc_effective/{t.index}/{t.node.input[1]}")
                del h
                if j + 1 < g1:   # inside a group: the group's own layers stay unquantized
                    advance(st.cut, stages[j + 1].cut, seg_name(j))
                bar.update(1)
            subs.update(pending)
            if g1 - g0 > 1 and pending:   # the group again, with its layers quantized
                carried = at_start
                for j in range(g0, g1 - 1):
                    advance(stages[j].cut, stages[j + 1].cut, seg_name(j))
            if g1 < len(stages):
                advance(stages[g1 - 1].cut, stages[g1].cut, seg_name(g1 - 1))
        outputs = None
        if final_outputs is not None:
            advance(stages[-1].cut, len(seg.nodes), "the last segment")
            outputs = [{o: value(o, w) for o in final_outputs} for w in range(len(feeds))]
    finally:
        bar.close()
        runner.close()
    return SequentialResult(layers, ranks, outputs)


def _hessian(values: list, tokens: int, name: str) -> tuple[torch.Tensor, int]:
    """sum over windows of x^T x (float32 product per window, float64 sum) / tokens."""
    total, rank = None, 0
    for act in values:
        if not isinstance(act, np.ndarray) or not np.issubdtype(act.dtype, np.floating):
            raise ValueError(f"target input {name} is not a float tensor")
        rank = int(act.ndim)
        a = torch.from_numpy(np.ascontiguousarray(act, dtype=np.float32).reshape(-1, act.shape[-1]))
        part = (a.T @ a).double()
        total = part if total is None else total + part
    return total / max(tokens, 1), rank


def lm_feeds(model: onnx.ModelProto, windows: torch.Tensor) -> list[dict]:
    """Graph inputs of each calibration window, as quipc_runtime.onnx_runtime.OnnxLM feeds a
    prompt with an empty KV cache (its conventions, without building a session)."""
    from quipc_runtime.onnx_runtime import OnnxLM

    lm = OnnxLM.__new__(OnnxLM)
    lm.session = _GraphIO(model)
    lm._inspect()
    past = lm._empty_past(1)
    out = []
    for ids in windows:
        arr = np.asarray(ids, dtype=np.int64)[None]
        feeds = {lm.ids_name: arr, **past}
        if lm.mask_name:
            feeds[lm.mask_name] = np.ones_like(arr)
        if lm.pos_name:
            feeds[lm.pos_name] = np.arange(arr.shape[1], dtype=np.int64)[None]
        out.append(feeds)
    return out


class _GraphIO:
    """The graph's inputs and outputs as onnxruntime's session describes them."""

    @dataclass
    class _Arg:
        name: str
        shape: list
        type: str

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        inits = {i.name for i in g.initializer}
        self._ins = [self._arg(v) for v in g.input if v.name not in inits]
        self._outs = [self._arg(v) for v in g.output]

    @classmethod
    def _arg(cls, v):
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return cls._Arg(v.name, shape, f"tensor({TensorProto.DataType.Name(tt.elem_type).lower()})")

    def get_inputs(self):
        return self._ins

    def get_outputs(self):
        return self._outs


__all__ = ["Stage", "plan_stages", "run_sequential", "lm_feeds", "effective_initializer", "SequentialResult"]
