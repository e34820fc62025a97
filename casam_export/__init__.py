"""casam-export: a CA-SAM bundle → separate ONNX graphs (+ TensorRT engines) and manifest.json."""

from casam_export.errors import ExportError, ParityError
from casam_export.export import export_bundle

__all__ = ["ExportError", "ParityError", "export_bundle"]
