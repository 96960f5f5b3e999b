"""The traced lowering's shared front: the artifact's transformers model, with its KV cache,
captured by torch.export (capture.py), for the families in families.py. The ONNX and TVM
backends translate the captured program (backends/onnx/traced.py, backends/tvm/traced.py)."""
from .capture import CacheLayout, Captured, CachedLM, Traceable, capture  # noqa: F401
from .families import FAMILIES, Family, family_for  # noqa: F401
