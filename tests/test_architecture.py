"""The torch-free shape table the converter checks conversions against equals every model class's own
state dict (names and shapes), at every depth and output stride."""

from __future__ import annotations

import pytest
import torch

from mobilenet_torch import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ForSemanticSegmentation,
    MobileNetV2Model,
)
from mobilenet_torch.architecture import state_shapes

CLASSES = (MobileNetV2Model, MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("depth, divisible_by", [(1.4, 8), (1.3, 8), (1.0, 8), (0.75, 8), (0.5, 1), (0.35, 8)])
@pytest.mark.parametrize("output_stride", [8, 32])
def test_state_shapes_equal_the_models_state_dicts(cls, depth, divisible_by, output_stride):
    config = MobileNetV2Config(
        depth_multiplier=depth,
        depth_divisible_by=divisible_by,
        min_depth=divisible_by,
        output_stride=output_stride,
        id2label={i: str(i) for i in range(21)},
    )
    with torch.device("meta"):
        model = cls(config)
    assert state_shapes(config, cls.__name__) == {name: tuple(t.shape) for name, t in model.state_dict().items()}
