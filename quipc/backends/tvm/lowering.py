"""Which module lowers a layer's code format to TIR: one module per format (formats that differ
only in a SHARED table, trellis and trellis256, share one).

Each lowering module provides, for a LinearSpec of its format,
    param_names(spec) -> [name]          the kernel's parameter arrays, in call order
    param_shapes(spec) / placeholders(spec)
    linear_params(layer, spec) -> {name: array}
    quip_linear_te(x, args, spec, mode, residual=None) -> y   (mode "gemv" | "gemm")
    SHARED: names of arrays that are the same for every layer of a format (codebook tables),
            which the model builder stores once per format, as "{format}.{name}";
(`linear_prim_func` below makes a standalone PrimFunc of any of them), and its schedule rules live in schedules/ (keyed on the "quipc.op" names its TE stages carry).
Adding a format to the TVM backend is adding a module here and a rule file there.
"""
from __future__ import annotations

import importlib

LOWERINGS = {
    "grid": "quipc.backends.tvm.tir_quip_linear",
    "e8p": "quipc.backends.tvm.tir_e8p_linear",
    "trellis": "quipc.backends.tvm.tir_trellis_linear",
    "trellis256": "quipc.backends.tvm.tir_trellis_linear",   # the same computation on its own table
    "grid4x2": "quipc.backends.tvm.tir_e8p4_grid",   # TVM-only: a 4-bit e8p layer (e8p_as_grid)
    "int8x2": "quipc.backends.tvm.tir_int8x2",       # TVM-only: a trellis head on 8 bits (trellis_as_int8)
}


def lowering(fmt: str):
    """The lowering module of format `fmt` (a LinearSpec's .format)."""
    if fmt not in LOWERINGS:
        raise ValueError(f"the TVM backend has no lowering for the code format {fmt!r} "
                         f"(it runs {', '.join(LOWERINGS)})")
    return importlib.import_module(LOWERINGS[fmt])


def linear_prim_func(spec, mode: str, rows=None, residual: bool = False):
    """A standalone PrimFunc (x, params..., [residual], y) of one layer in any format, for
    tests and kernel benchmarks; rows default to 1 (gemv) or the symbolic prefill length."""
    from tvm import te

    from .tir_quip_linear import prefill_rows

    low = lowering(spec.format)
    if rows is None:
        rows = 1 if mode == "gemv" else prefill_rows()
    x = te.placeholder((rows, spec.n), "float32", name="x")
    args = low.placeholders(spec)
    res = te.placeholder((rows, spec.m), "float32", name="residual") if residual else None
    y = low.quip_linear_te(x, args, spec, mode, residual=res)
    ins = [x] + [args[k] for k in low.param_names(spec)] + ([res] if res is not None else [])
    return te.create_prim_func(ins + [y])
