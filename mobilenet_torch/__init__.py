"""MobileNetV2 in PyTorch with TensorFlow-exact semantics; state dicts and config.json as transformers'."""

from .configuration import MobileNetV2Config
from .loading import ModelFolderError
from .modeling import (
    ENDPOINTS,
    MobileNetV2Backbone,
    MobileNetV2ForImageClassification,
    MobileNetV2ForSemanticSegmentation,
    MobileNetV2Model,
)

__all__ = [
    "ENDPOINTS",
    "MobileNetV2Backbone",
    "MobileNetV2Config",
    "MobileNetV2ForImageClassification",
    "MobileNetV2ForSemanticSegmentation",
    "MobileNetV2Model",
    "ModelFolderError",
]
