"""The "trellis256" code format in TVM: tir_trellis_linear's computation, which reads the layer's
format for its code table. A module of its own so that the build stores that shared table under
its own name (relax_model names a SHARED array by its lowering module), apart from "trellis"'s."""
from .tir_trellis_linear import SHARED, linear_params, param_names, param_shapes, placeholders, quip_linear_te

__all__ = ["SHARED", "linear_params", "param_names", "param_shapes", "placeholders", "quip_linear_te"]
