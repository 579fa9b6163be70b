"""deepship: fine-tune image and text classifiers, ship them as ONNX packages, watch them in production."""

__version__ = "0.1.0"
