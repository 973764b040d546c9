"""`predict-mobilenet IMAGE... --model DIR`: run a converted folder on images (a folder among the images
stands for the images it holds).

Classifiers print the top-k labels with probabilities for each image. DeepLab models write two PNGs per
image, `<image stem>_labels.png` (the raw label map: a palette image whose pixel values are the class ids,
coloured with the PASCAL VOC colour map) and `<image stem>_overlay.png` (the classes blended over the
image), and print the label histogram. The PNGs are written whether or not anyone still reads stdout
(`... | head -n 1`). Every image is processed; those that cannot be read are reported at the end and make
the exit code 1.
A folder converted from a quantized TFLite model holds two models: the integer one, which computes what
TFLite computes, runs by default; `--float` runs its float (dequantized) twin. stderr says which one ran.
Images are prepared as transformers' `MobileNetV2ImageProcessor` prepares them, from the folder's
`preprocessor_config.json`: RGB, shortest edge resized, center crop, scaled to [-1, 1]. DeepLab is fully
convolutional, so segmentation skips the crop and labels the whole (resized) picture.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from converter.app.cli import report_errors
from converter.errors import ImageError, OutputError, UsageError
from converter.images import image_suffixes, open_image, preprocess
from mobilenet_torch.quantized_files import INTEGER_WEIGHTS_FILE, QUANTIZATION_FILE

LABELS_SUFFIX = "_labels.png"
OVERLAY_SUFFIX = "_overlay.png"
OVERLAY_ALPHA = 0.55


@dataclass
class LoadedModel:
    model: Any
    segmentation: bool
    labels: dict[int, str]
    preprocessing: dict[str, Any]
    label_map: Callable | None  # segmentation: pixel values [N, 3, H, W] -> class ids [N, H, W]
    which: str | None  # which of a quantized folder's two models runs (None: the folder has one)


def load_model(folder: str | Path, use_float: bool = False) -> LoadedModel:
    """Load a converted folder with mobilenet_torch, choosing the class from `config.json`. A folder converted
    from a quantized source also holds the integer model: that one runs, unless `use_float`."""
    from converter.output import layout
    from converter.output.writer import preprocessor_config
    from mobilenet_torch import MobileNetV2ForSemanticSegmentation, load_pretrained

    check_converted(folder)
    model = load_pretrained(folder)
    folder = Path(folder)
    segmentation = isinstance(model, MobileNetV2ForSemanticSegmentation)
    try:
        preprocessing = json.loads((folder / layout.PREPROCESSOR).read_text())
    except (OSError, ValueError):
        preprocessing = preprocessor_config(model.config.image_size, segmentation)
    labels = dict(model.config.id2label)
    label_map = model.predict_labels if segmentation else None
    which = None
    if (folder / QUANTIZATION_FILE).is_file() and use_float:
        which = (
            f"running the float twin ({layout.WEIGHTS}) of the integer model; without --float, the integer model runs"
        )
    elif (folder / QUANTIZATION_FILE).is_file():
        from mobilenet_torch.quantized import QuantizedMobileNetV2

        model = integer_model = QuantizedMobileNetV2.from_pretrained(folder)

        def label_map(pixel_values):  # the graph's own ARG_MAX, at the input size
            return integer_model(pixel_values).labels

        which = (
            f"running the integer model ({INTEGER_WEIGHTS_FILE}), as TFLite computes it; --float runs its float twin"
        )
    return LoadedModel(model, segmentation, labels, preprocessing, label_map, which)


def check_converted(model: str | Path) -> None:
    """Refuse a source (a model file, an archive, a SavedModel or checkpoint folder) given where a converted
    folder belongs, with the command that converts it."""
    from converter.formats import FORMATS
    from converter.output import layout

    path = Path(model)
    if (path / layout.CONFIG).is_file() or not (path.is_file() or any(entry.sniff(path) for entry in FORMATS)):
        return
    output = path.stem.removesuffix(".tar") if path.is_file() else f"{path.name}_converted"
    raise UsageError(
        f"{model} is not a converted model folder: convert it first with "
        f"`convert-mobilenet --checkpoint {model} --output {output}`, then pass --model {output}"
    )


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
        labels = loaded.label_map(_pixels(image, loaded.preprocessing, crop=False))[0]
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


def image_paths(arguments: Iterable[str], failures: list[str]) -> Iterator[str]:
    """Each argument in turn; a folder stands for its images, sorted by name. Its other entries are skipped
    (their count said on stderr); a folder without images is a failure."""
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            yield argument
            continue
        try:
            entries = sorted(folder.iterdir())
        except OSError as error:
            failures.append(f"cannot list the folder {folder} ({error.strerror or error})")
            continue
        suffixes = image_suffixes()
        images = [str(entry) for entry in entries if entry.suffix.lower() in suffixes and entry.is_file()]
        if len(images) < len(entries):
            click.echo(f"note: skipped {len(entries) - len(images)} entries of {folder} that are not images", err=True)
        if not images:
            failures.append(f"the folder {folder} holds no images; pass image files or a folder of them")
        yield from images


class Results:
    """stdout, where the results go. When its reader goes away (`... | head -n 1`) the rest of them is
    dropped, not the work: the files are written all the same."""

    def __init__(self) -> None:
        self.reader_gone = False

    def print(self, lines: Iterable[str]) -> None:
        if self.reader_gone:
            return
        try:
            for line in lines:
                click.echo(line)
        except BrokenPipeError:
            self.reader_gone = True


def predict(
    images: Sequence[str],
    model: str,
    top: int = 5,
    output_dir: str | Path = ".",
    use_float: bool = False,
    results: Results | None = None,
) -> list[str]:
    """Classify or segment every image (a folder: the images in it); returns one message per image that
    could not be read. Classification stops once nobody reads its `results`; segmentation writes on."""
    results = results or Results()
    loaded = load_model(model, use_float)
    if loaded.which:
        click.echo(loaded.which, err=True)
    failures: list[str] = []
    for path in image_paths(images, failures):
        if results.reader_gone and not loaded.segmentation:
            break
        try:
            image = open_image(path)
        except ImageError as error:
            failures.append(str(error))
            continue
        if loaded.segmentation:
            lines = _segmentation_lines(loaded, image, Path(output_dir) / Path(path).stem)
        else:
            lines = [f"  {probability:8.4f}  {label}" for label, probability in classify(loaded, image, top)]
        results.print([str(path), *lines])
    return failures


def _segmentation_lines(loaded: LoadedModel, image, stem: Path) -> list[str]:
    """Write `<stem>_labels.png` and `<stem>_overlay.png`; the lines saying so, then the label histogram."""
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
    return [
        *(f"  wrote {target}" for target in targets),
        *(
            f"  {fraction:7.2%}  {pixels:>9} px  {label}"
            for label, pixels, fraction in histogram(labels, loaded.labels)
        ),
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(path_type=str),
    help="A folder written by convert-mobilenet (or the Hugging Face Hub id of one). A model file, archive or "
    "checkpoint must be converted first.",
)
@click.option(
    "--float",
    "use_float",
    is_flag=True,
    help="A folder converted from a quantized .tflite: run its float (dequantized) twin instead of the integer model.",
)
@click.option("--top", type=click.IntRange(min=1), default=5, help="Classifiers: how many labels to print.")
@click.option(
    "--output-dir",
    type=click.Path(path_type=str),
    default=".",
    help="Segmentation: where to write <image stem>_labels.png (the label map) and <image stem>_overlay.png "
    "(default: the current folder).",
)
@report_errors
def predict_main(images, model, top, output_dir, use_float):
    """Classify images (top-k labels) or segment them (label map and overlay PNGs) with a converted model
    folder; a folder among IMAGES stands for the images in it. Every image is processed; the ones that cannot
    be read are listed at the end (exit code 1)."""
    results = Results()
    failures = predict(images, model, top, output_dir, use_float, results)
    for message in failures:
        click.echo(f"error: {message}", err=True)
    if results.reader_gone:
        raise BrokenPipeError  # after the work: the exit status of a program whose reader went away
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    predict_main()
