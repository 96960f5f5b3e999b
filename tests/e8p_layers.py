"""Random layers of the code format "e8p" for the tests of every backend (C++/CUDA kernels,
ONNX, onnxruntime custom ops, TVM, the format itself)."""
from __future__ import annotations

import numpy as np

from quipc_runtime.formats.e8p import STAGES, join_indices
from quipc_runtime.layer import QuantizedLinear
from quipc_runtime.transforms import Transform

INDEX_RANGE = {"e8p": 1 << 16, "e8_1bit": 256}  # the indices of each stage's codebook


def random_e8p_layer(m, n, bits, seed=0, *, indices=None, kin="hadamard", kout="hadamard", t_in=None,
                     in_scale="random", bias=True, name="blk.0.proj"):
    """A random, valid e8p layer of shape (m, n) in the stored form (the input signs are in
    in_scale, not in t_in), with real transforms of kinds `kin` / `kout`.

    indices: one (m, n/8) index array per stage instead of random ones.
    t_in: this input transform instead of a new one (layers that share their input).
    in_scale: "random" (magnitudes in [0.5, 1.5), random signs), an array, or None.
    bias: a random bias, or none."""
    rng = np.random.default_rng(seed)
    if indices is None:
        indices = [rng.integers(0, INDEX_RANGE[k], size=(m, n // 8)) for k in STAGES[bits]]
    if t_in is None:
        t_in = Transform.make(kin, n, seed + 1)
        t_in.signs = None
    scale = (rng.random((m, len(STAGES[bits]))) * 0.02 + 0.001).astype(np.float16)
    if isinstance(in_scale, str) and in_scale == "random":
        in_scale = ((rng.random(n) + 0.5) * rng.choice([-1, 1], n)).astype(np.float16)
    layer = QuantizedLinear(
        name=name, out_features=m, in_features=n, bits=bits, format="e8p",
        codes=join_indices(indices, bits), scale=scale, zero=None,
        t_in=t_in, t_out=Transform.make(kout, m, seed + 2), in_scale=in_scale,
        bias=rng.standard_normal(m).astype(np.float32) if bias else None)
    layer.validate()
    return layer
