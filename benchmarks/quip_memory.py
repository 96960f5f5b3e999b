"""Peak memory of rounding ONE linear with a wide input (issue 14), in units of n x n float64.

    OMP_NUM_THREADS=1 python benchmarks/quip_memory.py --n 11008 --rows 256

A random positive definite H = X^T X / r (X: r x n Gaussian, float32 product, float64, as the
Hessian accumulators build it) and a random (rows, n) weight go through quantize_linear; reported:
VmHWM (/proc/self/status) above the resident memory just before the call (the high-water mark is
reset through /proc/self/clear_refs, so building H does not count), as MB and as multiples of
n*n*8 bytes, and the peak and seconds of each stage (regularize, eigh, rotate_hessian,
rotate_weight, proxy losses, encode; a stage's peak covers the time since the previous one
ended). The caller's H and W are not counted (they live before the call, as in a compile,
which hands H over: it is damped, tested (on disk, --scratch), rotated and factored in its
own memory; W comes as float16, --weight-dtype, as a float16 checkpoint's block holds it).
--save FILE writes codes / scales / in_scale (.npz) to compare two versions bit for bit.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Stages:
    """Wraps named callables: per stage, its peak resident bytes and seconds."""

    def __init__(self):
        self.peak = 0          # over everything since start()
        self.rows: list[dict] = []

    def start(self) -> int:
        _reset_peak()
        return _status("VmRSS")

    def _close_segment(self) -> None:
        self.peak = max(self.peak, _status("VmHWM"))
        _reset_peak()

    def wrap(self, name: str, fn):
        def run(*a, **k):
            self._close_segment()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds = time.perf_counter() - t0
                hwm = _status("VmHWM")
                self.peak = max(self.peak, hwm)
                self.rows.append({"stage": name, "peak": hwm, "seconds": seconds})
                _reset_peak()
        return run

    def finish(self) -> int:
        self._close_segment()
        return self.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--rows", type=int, default=256, help="output rows of the linear")
    ap.add_argument("--calib", type=int, default=2048, help="rows of X in H = X^T X / r")
    ap.add_argument("--format", default="e8p")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--rescale", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-dtype", default="float16", choices=["float16", "float32"],
                    help="the weight as a compile hands it over (float16: a float16 checkpoint, quipc/memory.py)")
    ap.add_argument("--scratch", default=".", help="folder for the damping test's copy of H on disk "
                    "(as a compile's OUT/.hessians); '' tests in memory")
    ap.add_argument("--save", help="write codes / scale / in_scale to this .npz")
    ap.add_argument("--json", help="append the record to this JSON list")
    args = ap.parse_args()

    from quipc.config import QuantConfig
    from quipc.passes import encoders, methods
    from quipc.passes.encoders import e8p as e8p_enc

    n = args.n
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.calib, n, generator=gen) * (1 + torch.rand(n, generator=gen) * 3)
    h = (x.t() @ x).double() / args.calib
    del x
    w = (torch.randn(args.rows, n, generator=gen) * 0.02).to(getattr(torch, args.weight_dtype))
    cfg = QuantConfig(method="quip", bits=args.bits, format=args.format, rescale=args.rescale).validate()

    st = Stages()
    methods.regularize = st.wrap("regularize", methods.regularize)
    methods.rotate_hessian = st.wrap("rotate_hessian", methods.rotate_hessian)
    methods.mu_hessian = st.wrap("mu_hessian (eigh)", methods.mu_hessian)
    methods._relative_losses = st.wrap("proxy losses", methods._relative_losses)
    for name in ("_spent_losses_before", "_spent_rtn_loss"):
        if hasattr(methods, name):
            setattr(methods, name, st.wrap("proxy losses", getattr(methods, name)))
    if hasattr(methods, "rotate_weight"):
        methods.rotate_weight = st.wrap("rotate_weight", methods.rotate_weight)
    methods.encode = st.wrap("encode", methods.encode)
    eigh = torch.linalg.eigh
    torch.linalg.eigh = st.wrap("eigh", eigh)
    if hasattr(methods, "_mu_eigenvectors"):
        methods._mu_eigenvectors = st.wrap("mu diagnostics (eigh)", methods._mu_eigenvectors)
    del encoders, e8p_enc

    base = st.start()
    t0 = time.perf_counter()
    # a group of one linear (as down_proj): its cache may go once it is rounded, and H is spent
    # (damped, rotated and factored in its own memory) as a compile spends it (where supported)
    fields = methods.LayerInput.__dataclass_fields__
    last = {k: True for k in ("last_reader", "spend_hessian") if k in fields}
    if "scratch_dir" in fields and args.scratch:
        last["scratch_dir"] = args.scratch
    layer = methods.quantize_linear(methods.LayerInput("probe", w, None, h, **last), cfg)
    seconds = time.perf_counter() - t0
    peak = st.finish()
    torch.linalg.eigh = eigh

    unit = n * n * 8
    rec = {"n": n, "rows": args.rows, "format": args.format, "bits": args.bits, "rescale": args.rescale,
           "weight_dtype": args.weight_dtype, "scratch": bool(args.scratch),
           "threads": torch.get_num_threads(), "baseline_mb": base / 2**20,
           "peak_above_baseline_mb": (peak - base) / 2**20, "peak_nn_units": (peak - base) / unit,
           "seconds": seconds,
           "stages": [{"stage": r["stage"], "peak_nn_units": round((r["peak"] - base) / unit, 3),
                       "seconds": round(r["seconds"], 2)} for r in st.rows],
           "info": {k: v for k, v in layer.info.items() if k.startswith(("mu", "proxy"))}}
    print(json.dumps(rec, indent=1))
    if args.save:
        np.savez(args.save, codes=layer.codes, scale=layer.scale,
                 in_scale=layer.in_scale if layer.in_scale is not None else np.zeros(0))
    if args.json:
        from pathlib import Path

        path = Path(args.json)
        records = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(records + [rec], indent=1) + "\n")


if __name__ == "__main__":
    main()
