"""A random but valid trellis layer with real transforms (tests and benchmarks import it)."""
import numpy as np
import torch

from quipc.config import QuantConfig
from quipc.passes.encoders import encode


def random_trellis_layer(m, n, bits, seed=0, name="blk.0.proj", fmt="trellis"):
    """A valid layer of trellis format `fmt` ("trellis" or "trellis256") of shape (m, n) with real
    transforms, encoded from random weights."""
    from quipc_runtime.layer import QuantizedLinear
    from quipc_runtime.transforms import Transform

    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32) * 0.02)
    enc = encode(fmt, w, None, QuantConfig(bits=bits, format=fmt))
    t_in = Transform.make("hadamard", n, seed + 1)
    t_in.signs = None
    layer = QuantizedLinear(name=name, out_features=m, in_features=n, bits=bits, format=fmt,
                            codes=enc.codes, scale=enc.scale, zero=None, t_in=t_in,
                            t_out=Transform.make("hadamard", m, seed + 2),
                            in_scale=((rng.random(n) + 0.5) * rng.choice([-1, 1], n)).astype(np.float16),
                            bias=rng.standard_normal(m).astype(np.float32))
    layer.validate()
    return layer
