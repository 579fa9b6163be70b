"""Torch-free runtime: package verification, preprocessing, the onnxruntime predictor, input reading.

Nothing under deepship.runtime may import torch, torchvision, lightning or transformers.
"""

from deepship.runtime.modality import ImageModality, Modality, TextModality, modality_for
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
    "ImageModality",
    "Modality",
    "Prediction",
    "Predictor",
    "IMAGE_INPUT",
    "ImageSpec",
    "TextModality",
    "TextPreprocessor",
    "TextSpec",
    "load_image",
    "modality_for",
    "preprocess_image",
    "preprocess_images",
]
