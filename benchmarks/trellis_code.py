"""What a computed trellis code would cost in quality: the "trellis" format with its code table
replaced, at the model level.

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", required=True, choices=("lut", "1mad"))
    ap.add_argument("quipc_args", nargs=argparse.REMAINDER, help="after --: the quipc command line")
    a = ap.parse_args()
    args = a.quipc_args[1:] if a.quipc_args[:1] == ["--"] else a.quipc_args
    if "eval" in args and "--backend" not in args:
        raise SystemExit("evaluate with --backend reference: the C++ kernels keep the format's own table")
    use_code(a.code)
    from quipc.cli import main as quipc_main

    return quipc_main(args)


if __name__ == "__main__":
    sys.exit(main())
