"""ONNX backend: quipc artifacts -> ONNX models with QuipLinear nodes (ai.quipc domain)."""
from .export import export_artifact, export_hf_model  # noqa: F401
