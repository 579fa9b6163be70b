"""Export: a finished run -> a gated, self-describing ONNX model package."""

from deepship.export.package import ExportOptions, export_package
from deepship.export.quantize import AccuracyBudget

__all__ = ["AccuracyBudget", "ExportOptions", "export_package"]
