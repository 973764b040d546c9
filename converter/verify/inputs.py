"""The inputs both models run on: seeded random images (a batch at the model's size, an odd size, a
non-square one) and image files preprocessed as transformers does, fitted to what the reference takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ImageError, VerificationError
from converter.images import open_image, preprocess
from converter.output.writer import preprocessor_config
from converter.pipeline.table import CLASSIFICATION, DEEPLAB
from converter.vocabulary import BACKBONE

RANDOM = "random"
RANDOM_BATCH = 2
ODD_SIZE = {CLASSIFICATION: 97, DEEPLAB: 129, BACKBONE: 97}
NON_SQUARE = (160, 192)  # (height, width)


@dataclass
class InputCase:
    name: str
    description: str
    pixels: np.ndarray  # NCHW float32 in [-1, 1]


def make_inputs(
    specs: Sequence[str], kind: str, size: int, preprocessing: dict[str, Any] | None = None
) -> list[InputCase]:
    """`random` gives seeded images in [-1, 1]: a batch of 2 at `size`, one at an odd size and one
    non-square; any other spec is an image file, preprocessed like transformers' MobileNetV2ImageProcessor."""
    cases: list[InputCase] = []
    for spec in specs or (RANDOM,):
        if spec == RANDOM:
            odd = ODD_SIZE[kind]
            cases += [
                random_case(f"random-{size}x{size}", RANDOM_BATCH, size, size, seed=0),
                random_case(f"random-{odd}x{odd}", 1, odd, odd, seed=1),
                random_case(f"random-{NON_SQUARE[0]}x{NON_SQUARE[1]}", 1, *NON_SQUARE, seed=2),
            ]
        else:
            path = Path(spec)
            settings = preprocessing or preprocessor_config(size, segmentation=kind == DEEPLAB)
            try:
                pixels = preprocess(open_image(path), settings)
            except ImageError as error:
                raise VerificationError(str(error)) from None
            cases.append(InputCase(f"image-{path.name}", f"{path.name}, preprocessed", pixels[None]))
    names = [case.name for case in cases]
    return [case for i, case in enumerate(cases) if case.name not in names[:i]]


def random_case(name: str, batch: int, height: int, width: int, seed: int) -> InputCase:
    pixels = np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, 3, height, width)).astype(np.float32)
    return InputCase(name, f"uniform [-1, 1], seed {seed}, batch {batch}", pixels)


def fit_to_reference(cases: list[InputCase], reference, notes: list[str]) -> list[InputCase]:
    """Inputs as the reference graph takes them: padded to its crop (DeepLab export graphs), or only those
    of its fixed size; never none."""
    crop = reference.info.crop_size
    if crop:
        return _pad_to_crop(cases, crop, notes)
    kept = [case for case in cases if reference.accepts(*case.pixels.shape[-2:])]
    dropped = [case.name for case in cases if case not in kept]
    if dropped:
        _, height, width = reference.fixed_shape
        notes.append(f"the reference graph fixes its input at {height}x{width}: skipped {', '.join(dropped)}")
    if not kept:
        _, height, width = reference.fixed_shape
        kept = [random_case(f"random-{height}x{width}", 1, height, width, seed=3)]
    return kept


def _pad_to_crop(cases: list[InputCase], crop: int, notes: list[str]) -> list[InputCase]:
    """A graph built with a crop size (DeepLab's export_model.py) pads every image at the bottom and right
    to the crop with the mean pixel (0 once scaled to [-1, 1]) and pools over the crop's whole feature map
    with a fixed window, so it only computes on padded images: both models get the padded image."""
    kept, dropped = [], []
    for case in cases:
        height, width = case.pixels.shape[-2:]
        if height > crop or width > crop:
            dropped.append(case.name)
            continue
        pixels = np.pad(case.pixels, ((0, 0), (0, 0), (0, crop - height), (0, crop - width)))
        kept.append(InputCase(case.name, f"{case.description}, padded to {crop}x{crop}", pixels))
    notes.append(
        f"the reference graph pads every image to its {crop}x{crop} crop with the mean pixel (as DeepLab's "
        "export_model.py does) and pools with a window fixed by the crop: every input was padded so"
        + (f"; {', '.join(dropped)} larger than the crop skipped" if dropped else "")
    )
    return kept or [random_case(f"random-{crop}x{crop}", 1, crop, crop, seed=3)]
