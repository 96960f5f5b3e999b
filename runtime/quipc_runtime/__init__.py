"""quipc_runtime: what a deployment needs to run a quipc artifact.

It reads and validates artifacts (numpy + safetensors), and rebuilds a torch model whose
quantized linears run the reference path or the C++/CUDA kernels. It never imports the
compiler (`quipc`).
"""
from .artifact import ArtifactError, read_manifest  # noqa: F401
from .layer import QuantizedLinear  # noqa: F401
from .transforms import Transform  # noqa: F401

__version__ = "0.1.0"


def load(folder, device: str = "cpu", backend: str = "reference", int8_activations: bool = False,
         trellis_as_int8: bool | str = "all"):
    """Load an artifact as a transformers causal LM (generate() works). Backend "kernels" on the
    CPU: int8_activations, the 4-bit GEMVs take int8 activations; trellis_as_int8, which trellis
    layers' GEMVs run on an 8-bit copy of their rows: "all" (default) every trellis layer's, True
    or "head" a trellis lm_head's, False or "none" none (the exact GEMV; `kernels.prepare`)."""
    from .loader import load_model

    return load_model(folder, device=device, backend=backend, int8_activations=int8_activations,
                      trellis_as_int8=trellis_as_int8)
