"""ONNX backend: quipc artifacts -> ONNX models with QuipLinear nodes (ai.quipc domain).
export_artifact: an artifact of any supported family through the traced graph (traced.py);
export_hf_model: the fp32 reference graph of a transformers Llama (llama.py)."""
from .export import export_hf_model  # noqa: F401
from .traced import export_traced as export_artifact  # noqa: F401
