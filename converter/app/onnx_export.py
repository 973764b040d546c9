"""ONNX export of a converted model: fixed spatial size, dynamic batch, `logits` as the one output.

The input is `pixel_values` [batch, channels, height, width] (NCHW, scaled to [-1, 1]); the output
`logits` is the PyTorch model's `.logits`. The spatial size is fixed because TensorFlow's 'SAME'
padding depends on it: export again for another size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

import mobilenet_torch

MIN_OPSET = 18  # what PyTorch's exporter writes natively; its conversion to 17 fails on Pad


def export_onnx(
    model_or_folder: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    opset: int = MIN_OPSET,
    size: int | tuple[int, int] | None = None,
) -> Path:
    """Write a mobilenet_torch model (or a folder written by convert-mobilenet) as one `.onnx` file.

    Args:
        model_or_folder: a `MobileNetV2ForImageClassification` or `...ForSemanticSegmentation`, or its folder.
        path: the file to write (weights inside it, no side files).
        opset: ONNX opset, 18 or newer (PyTorch's exporter writes 18 and fails to convert this graph down).
        size: input height and width (an int for a square); default `config.image_size`.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the export needs opset {MIN_OPSET} or newer")
    model = (
        mobilenet_torch.load_pretrained(model_or_folder)
        if isinstance(model_or_folder, (str, os.PathLike))
        else model_or_folder
    )
    config = model.config
    height, width = (size, size) if isinstance(size, int) else size or (config.image_size, config.image_size)
    example = torch.zeros(2, config.num_channels, height, width)  # a batch of 1 would be fixed to 1
    return export_module(model.eval(), example, path, opset)


def export_module(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = MIN_OPSET) -> Path:
    """Export a module taking one NCHW tensor and returning a tensor or a tuple of tensors (the model's
    outputs are named tuples); the batch axis stays dynamic. The benchmark uses it for its reference too."""
    path = Path(path)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["pixel_values"],
            output_names=["logits"],
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs and warns about things that do not concern this model (torchvision ops, its own
    deprecations); keep the command's output to what matters."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)
