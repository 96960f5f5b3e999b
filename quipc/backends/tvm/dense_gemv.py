"""Decode's dense (unquantized) linears in the traced build: y = x W^T + b for one row, W read
as stored (out_features, in_features).

A linear the artifact keeps dense (an lm_head at `--head-bits 32`, a family's unquantized
projection) came through torch.export's decomposition as a transpose of W and a matmul, which
the decode function ran with TVM's default loop nests: SmolLM2's 49152 x 576 head copied its
113 MB table into a transposed one and multiplied element by element, 190 of 199 ms a token.
Here each output is a dot product over W's contiguous row, in 8 lanes (decode's row, and the
last row per sequence that a prefill computes logits for):
    part[b, o, q] = sum_kk x[b, kk*8 + q] W[o, kk*8 + q]     (outputs in parallel, q vectorized)
    y[b, o]       = sum_q part[b, o, q] (+ bias[o])
"""
from __future__ import annotations

from tvm import s_tir, te

LANES = 8


def applies(shape: list, n: int) -> bool:
    """x of `shape` (..., n) is one row per sequence (decode, or a prefill's last row): every
    dimension between the batch and the features a static 1."""
    ones = all(isinstance(d, int) and d == 1 for d in shape[1:-1])
    return ones and len(shape) >= 2 and n % LANES == 0


def dense_gemv_te(x, w, bias=None):
    """x (rows, n), w (m, n) [, bias (m,)] -> y (rows, m)."""
    rows, n = x.shape
    m = w.shape[0]
    kk = te.reduce_axis((0, n // LANES), name="kk")
    part = te.compute((rows, m, LANES), lambda b, o, q: te.sum(
        x[b, kk * LANES + q] * w[o, kk * LANES + q], axis=kk), name="dense_part")
    q = te.reduce_axis((0, LANES), name="q")
    if bias is None:
        return te.compute((rows, m), lambda b, o: te.sum(part[b, o, q], axis=q), name="dense_out")
    acc = te.compute((rows, m), lambda b, o: te.sum(part[b, o, q], axis=q), name="dense_acc")
    return te.compute((rows, m), lambda b, o: acc[b, o] + bias[o], name="dense_out")


def prim_func(n: int, m: int, bias: bool, rows=1):
    """The scheduled PrimFunc (x, w[, bias], y); rows: 1 or a symbolic batch size."""
    x = te.placeholder((rows, n), "float32", name="x")
    w = te.placeholder((m, n), "float32", name="w")
    b = te.placeholder((m,), "float32", name="bias") if bias else None
    y = dense_gemv_te(x, w, b)
    func = te.create_prim_func([x, w] + ([b] if bias else []) + [y])
    sch = s_tir.Schedule(func)
    part = sch.get_sblock("dense_part")
    bl, o, q, kk = sch.get_loops(part)
    sch.reorder(bl, o, kk, q)
    outer = sch.fuse(bl, o)
    sch.parallel(outer)
    sch.vectorize(q)
    sch.decompose_reduction(part, kk)
    for name in ("dense_acc", "dense_out") if bias else ("dense_out",):
        sch.reverse_compute_at(sch.get_sblock(name), outer)
    return sch.mod["main"]
