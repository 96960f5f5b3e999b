"""quipc_runtime: what a deployment needs to run a quipc artifact.

It reads and validates artifacts (numpy + safetensors), and rebuilds a torch model whose
quantized linears run the reference path or the C++/CUDA kernels. It never imports the
compiler (`quipc`).
"""
from .artifact import ArtifactError, read_manifest  # noqa: F401
from .layer import QuantizedLinear  # noqa: F401
from .transforms import Transform  # noqa: F401

__version__ = "0.1.0"


def load(folder, device: str = "cpu", backend: str = "reference", int8_activations: bool = False):
    """Load an artifact as a transformers causal LM (generate() works). int8_activations (backend
    "kernels", CPU): the 4-bit GEMVs take int8 activations (`kernels.prepare`)."""
    from .loader import load_model

    return load_model(folder, device=device, backend=backend, int8_activations=int8_activations)
