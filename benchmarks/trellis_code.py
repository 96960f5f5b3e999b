"""Trellis codes compared: on Gaussian sequences, and at the model level.

    python benchmarks/trellis_code.py --mse [--sequences 1024] [--json OUT]

encodes `--sequences` tail-biting sequences of 256 unit Gaussians (the 16x16 tiles' sequences; a
fixed seed) with each code at 2, 3 and 4 bits, each at its best of a grid of row scales, and
reports the mean squared error: `lut` ("trellis": quantiles at hashed states), `trellis256` (the
format of that name: 256 int8 values in interleaved rows, indexed by the state's low byte XOR a
hash of its top nibble) and `1mad` (below).

    python benchmarks/trellis_code.py --code lut|1mad -- QUIPC ARGS...

runs `quipc QUIPC ARGS...` (a compile, then an eval with `--backend reference`) in this process
with the trellis code table swapped for the encoder (the Viterbi search) and the torch reference
decoder. `lut` is the format's own table (standard-normal quantiles at hashed states);
`1mad` is QTIP's "1MAD" code computed from the 12-bit state s, x = (34038481 s + 76625530) mod
2^32, value = (sum of x's four bytes - 510), scaled to unit mean square, which a CPU kernel can
compute in a few vector instructions instead of a table gather. Only for measurement: the C++,
ONNX and TVM decoders keep the format's own table, so evaluate with `--backend reference`.
Example (the record in docs/results/quality.md, "Code formats and fine-tuning"):

    python benchmarks/trellis_code.py --code 1mad -- --threads 2 compile smollm2-135m --bits 2 \\
        --format trellis --calib wiki.valid.tokens --finetune none --head-bits 32 --embed-bits 32 -o OUT
    python benchmarks/trellis_code.py --code 1mad -- --threads 2 eval OUT --backend reference \\
        --text wiki.test.raw --windows 16 --json
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

MAD_A, MAD_B = 34038481, 76625530


def one_mad_table(L: int = 12) -> np.ndarray:
    """QTIP's 1MAD code for the 2^L states, float32 with unit mean square (read-only)."""
    s = np.arange(1 << L, dtype=np.uint64)
    x = (np.uint64(MAD_A) * s + np.uint64(MAD_B)) & np.uint64(0xFFFFFFFF)
    byte_sum = sum(((x >> np.uint64(8 * i)) & np.uint64(255)).astype(np.int64) for i in range(4))
    v = (byte_sum - 510).astype(np.float64)
    table = (v / np.sqrt(np.mean(v ** 2))).astype(np.float32)
    table.flags.writeable = False
    return table


def use_code(code: str) -> None:
    if code == "lut":
        return
    if code != "1mad":
        raise SystemExit(f"unknown --code {code!r}: lut or 1mad")
    import quipc.passes.encoders.trellis as encoder
    import quipc_runtime.formats.trellis as fmt

    table = one_mad_table(fmt.STATE_BITS)
    fmt.code_table = encoder.code_table = lambda L=fmt.STATE_BITS: table


MSE_SCALES = (0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25)   # table multipliers tried per code and width


def mse_study(sequences: int, seed: int = 1234) -> dict:
    """{code: {bits: {"mse", "scale"}}} on `sequences` x 256 unit Gaussians, plus each code's
    ratio to lut's."""
    from quipc.passes.encoders.trellis_viterbi import encode_sequences
    from quipc_runtime.formats.trellis import STATE_BITS, code_table

    x = np.random.default_rng(seed).standard_normal((sequences, 256)).astype(np.float32)
    codes = {"lut": code_table("trellis"), "trellis256": code_table("trellis256"), "1mad": one_mad_table(STATE_BITS)}
    out: dict = {}
    for name, table in codes.items():
        out[name] = {}
        for k in (2, 3, 4):
            best = None
            for c in MSE_SCALES:
                t = (table * c).astype(np.float32)
                e = float(np.mean((x - t[encode_sequences(x, t, k)]) ** 2))
                best = (e, c) if best is None or e < best[0] else best
            out[name][k] = {"mse": best[0], "scale": best[1]}
    for name in codes:
        for k in (2, 3, 4):
            out[name][k]["vs_lut"] = out[name][k]["mse"] / out["lut"][k]["mse"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", choices=("lut", "1mad"))
    ap.add_argument("--mse", action="store_true", help="the Gaussian-sequence study (no model)")
    ap.add_argument("--sequences", type=int, default=1024)
    ap.add_argument("--json", default=None, help="--mse: write the results here")
    ap.add_argument("quipc_args", nargs=argparse.REMAINDER, help="after --: the quipc command line")
    a = ap.parse_args()
    if a.mse:
        res = mse_study(a.sequences)
        for name, by_bits in res.items():
            print(f"{name:11s}" + "".join(f"  {k} bits {v['mse']:.5f} (x{v['vs_lut']:.3f}, scale {v['scale']})"
                                           for k, v in by_bits.items()))
        if a.json:
            import json

            with open(a.json, "w") as f:
                json.dump({"command": "python benchmarks/trellis_code.py --mse --sequences "
                                      f"{a.sequences}", "sequences": a.sequences, "length": 256, "results": res}, f, indent=1)
        return 0
    if a.code is None:
        ap.error("give --mse, or --code and a quipc command line")
    args = a.quipc_args[1:] if a.quipc_args[:1] == ["--"] else a.quipc_args
    if "eval" in args and "--backend" not in args:
        raise SystemExit("evaluate with --backend reference: the C++ kernels keep the format's own table")
    use_code(a.code)
    from quipc.cli import main as quipc_main

    return quipc_main(args)


if __name__ == "__main__":
    sys.exit(main())
