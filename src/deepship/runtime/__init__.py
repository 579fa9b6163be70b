"""Torch-free runtime: preprocessing (and, later, the onnxruntime predictor) for serving hosts.

Nothing under deepship.runtime may import torch, torchvision, lightning or transformers.
"""

from deepship.runtime.predictor import Prediction, Predictor
from deepship.runtime.preprocess import (
    IMAGE_INPUT,
    ImageSpec,
    TextPreprocessor,
    TextSpec,
    load_image,
    preprocess_image,
    preprocess_images,
)

__all__ = [
    "Prediction",
    "Predictor",
    "IMAGE_INPUT",
    "ImageSpec",
    "TextPreprocessor",
    "TextSpec",
    "load_image",
    "preprocess_image",
    "preprocess_images",
]
