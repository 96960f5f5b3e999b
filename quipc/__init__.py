"""quipc: QuIP quantization compiler for LLMs (2, 3 and 4 bits)."""
from quipc_runtime import load  # noqa: F401  (an artifact loads without the compiler)

from .config import QuantConfig  # noqa: F401

__version__ = "0.1.0"
