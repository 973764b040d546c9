"""`predict-mobilenet IMAGE... --model DIR`: run a converted folder on images.

Classifiers print the top-k labels with probabilities for each image. DeepLab models write two PNGs per
image, `<image stem>_labels.png` (the raw label map: a palette image whose pixel values are the class ids,
coloured with the PASCAL VOC colour map) and `<image stem>_overlay.png` (the classes blended over the
image), and print the label histogram. Every image is processed; those that cannot be read are reported
at the end and make the exit code 1.
Images are prepared as transformers' `MobileNetV2ImageProcessor` prepares them, from the folder's
`preprocessor_config.json`: RGB, shortest edge resized, center crop, scaled to [-1, 1]. DeepLab is fully
convolutional, so segmentation skips the crop and labels the whole (resized) picture.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from converter.app.cli import report_errors
from converter.errors import ImageError, OutputError
from converter.images import open_image, preprocess

LABELS_SUFFIX = "_labels.png"
OVERLAY_SUFFIX = "_overlay.png"
OVERLAY_ALPHA = 0.55


@dataclass
class LoadedModel:
    model: Any
    segmentation: bool
    labels: dict[int, str]
    preprocessing: dict[str, Any]


def load_model(folder: str | Path) -> LoadedModel:
    """Load a converted folder with mobilenet_torch, choosing the class from `config.json`."""
    from converter.output import layout
    from converter.output.writer import preprocessor_config
    from mobilenet_torch import MobileNetV2ForSemanticSegmentation, load_pretrained

    folder = Path(folder)
    model = load_pretrained(folder)
    segmentation = isinstance(model, MobileNetV2ForSemanticSegmentation)
    try:
        preprocessing = json.loads((folder / layout.PREPROCESSOR).read_text())
    except (OSError, ValueError):
        preprocessing = preprocessor_config(model.config.image_size, segmentation)
    return LoadedModel(model, segmentation, dict(model.config.id2label), preprocessing)


def _pixels(image, preprocessing: dict[str, Any], crop: bool = True):
    """A batch of one image for the model (NCHW tensor)."""
    import torch

    return torch.from_numpy(preprocess(image, preprocessing, crop))[None]


def classify(loaded: LoadedModel, image, top: int = 5) -> list[tuple[str, float]]:
    """The `top` most probable labels with their softmax probabilities."""
    import torch

    with torch.inference_mode():
        logits = loaded.model(_pixels(image, loaded.preprocessing)).logits
    if logits.ndim == 4:  # fixed 7x7 pooling on a larger map: average the map of logits
        logits = logits.mean(dim=(2, 3))
    probabilities = logits.float().softmax(-1)[0]
    values, indices = probabilities.topk(min(top, probabilities.numel()))
    return [(loaded.labels.get(int(i), f"LABEL_{int(i)}"), float(v)) for v, i in zip(values, indices, strict=True)]


def segment(loaded: LoadedModel, image) -> np.ndarray:
    """The label map [H, W] at the image's own size (nearest-neighbour from the model's resolution)."""
    import torch
    from PIL import Image

    with torch.inference_mode():
        labels = loaded.model.predict_labels(_pixels(image, loaded.preprocessing, crop=False))[0]
    labels = labels.to(torch.int32).numpy()
    if labels.shape != (image.height, image.width):
        resized = Image.fromarray(labels).resize(image.size, Image.Resampling.NEAREST)
        labels = np.asarray(resized, dtype=np.int32)
    return labels


def palette(count: int) -> np.ndarray:
    """The PASCAL VOC colour map: class bits spread over the high bits of R, G and B."""
    colours = np.zeros((count, 3), np.uint8)
    for index in range(count):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def label_image(labels: np.ndarray):
    """The label map as a palette PNG image: pixel values are the class ids, the palette PASCAL VOC's."""
    from PIL import Image

    if labels.max(initial=0) > 255:
        raise OutputError(f"a label map PNG holds class ids up to 255, but this model predicts {labels.max()}")
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    image.putpalette(palette(256).tobytes())
    return image


def overlay(image, labels: np.ndarray, alpha: float = OVERLAY_ALPHA):
    """The image with every non-background pixel tinted in its class colour."""
    from PIL import Image

    base = np.asarray(image, dtype=np.float32)
    colours = palette(int(labels.max()) + 1).astype(np.float32)[labels]
    mask = (labels != 0)[..., None]
    blended = np.where(mask, base * (1 - alpha) + colours * alpha, base)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def histogram(labels: np.ndarray, names: dict[int, str]) -> list[tuple[str, int, float]]:
    """(label, pixels, fraction) for every label present, most frequent first."""
    values, counts = np.unique(labels, return_counts=True)
    total = labels.size
    rows = [(names.get(int(v), f"LABEL_{int(v)}"), int(c), c / total) for v, c in zip(values, counts, strict=True)]
    return sorted(rows, key=lambda row: -row[1])


def predict(images: Sequence[str], model: str, top: int = 5, output_dir: str | Path = ".") -> list[str]:
    """Classify or segment every image; returns one message per image that could not be read."""
    loaded = load_model(model)
    failures = []
    for path in images:
        try:
            image = open_image(path)
        except ImageError as error:
            failures.append(str(error))
            continue
        click.echo(str(path))
        if loaded.segmentation:
            _report_segmentation(loaded, image, Path(output_dir) / Path(path).stem)
        else:
            for label, probability in classify(loaded, image, top):
                click.echo(f"  {probability:8.4f}  {label}")
    return failures


def _report_segmentation(loaded: LoadedModel, image, stem: Path) -> None:
    """Write `<stem>_labels.png` and `<stem>_overlay.png`, then print the label histogram."""
    labels = segment(loaded, image)
    targets = {
        Path(f"{stem}{LABELS_SUFFIX}"): label_image(labels),
        Path(f"{stem}{OVERLAY_SUFFIX}"): overlay(image, labels),
    }
    for target, picture in targets.items():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            picture.save(target)
        except OSError as error:
            message = f"cannot write {target} ({error.strerror or error}); choose another --output-dir"
            raise OutputError(message) from None
        click.echo(f"  wrote {target}")
    for label, pixels, fraction in histogram(labels, loaded.labels):
        click.echo(f"  {fraction:7.2%}  {pixels:>9} px  {label}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", "model", required=True, type=click.Path(path_type=str), help="A converted model folder.")
@click.option("--top", type=click.IntRange(min=1), default=5, help="Classifiers: how many labels to print.")
@click.option(
    "--output-dir",
    type=click.Path(path_type=str),
    default=".",
    help="Segmentation: where to write <image stem>_labels.png (the label map) and <image stem>_overlay.png "
    "(default: the current folder).",
)
@report_errors
def predict_main(images, model, top, output_dir):
    """Classify images (top-k labels) or segment them (label map and overlay PNGs) with a converted model
    folder. Every image is processed; the ones that cannot be read are listed at the end (exit code 1)."""
    failures = predict(images, model, top, output_dir)
    for message in failures:
        click.echo(f"error: {message}", err=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    predict_main()
