"""The data sets `eval-mobilenet` reads, and each source's own evaluation preprocessing.

Classification: a folder of class subfolders, or a file of `path label` lines (paths relative to the file).
A class is named by a label of the model's `id2label` (the whole label or one of its comma-separated
names, case and `_`/space aside), by an index, by ImageNet's WordNet id (`n01440764`) where the model's
classes are ImageNet's, or through a `--class-map` file of `name label` lines. Folders none of whose names
is a label, as many as the model has classes, are the user's own classes numbered in sorted order, as
Keras' `image_dataset_from_directory` numbers them.

Segmentation: the PASCAL VOC layout, `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette PNGs whose
pixel values are class ids, 255 = ignore) and `ImageSets/Segmentation/<split>.txt`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import DataSetError, ImageError
from converter.images import image_suffixes, open_image, scale
from converter.slim import IMAGENET, imagenet_wnids, labels_dataset
from converter.vocabulary import CLASSIFICATION, DEEPLAB

IGNORE_LABEL = 255  # PASCAL VOC's "void": excluded from every figure
MEAN_PIXEL = 127.5  # what DeepLab's evaluation pads images with (before scaling)
SLIM_CENTRAL_FRACTION = 0.875  # slim's inception_preprocessing for evaluation
VOC_PARTS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
DEFAULT_SPLIT = "val"

#: Each source's own evaluation preprocessing, by name (`--preprocessing`), with what eval.json says of it.
PREPROCESSINGS = {
    "slim": "slim's evaluation (inception_preprocessing): the central 87.5% of the image, resized bilinearly "
    "(half-pixel centers, no antialiasing) to the model's size",
    "processor": "the folder's preprocessor_config.json (MobileNetV2ImageProcessor: shortest edge resized, "
    "center crop), which records the source's own input preparation (Keras, Teachable Machine)",
    "deeplab": "DeepLab's evaluation: images larger than the crop size resized so that their long side fits "
    "(labels by nearest neighbour), then padded at the bottom and right to the crop size with the mean "
    "pixel (labels with 255, ignored)",
}


@dataclass(frozen=True)
class Sample:
    image: Path
    target: int | Path  # a class index, or a label PNG


@dataclass
class DataSet:
    """The samples of a data set, sorted by path, and what eval.json says about it."""

    kind: str
    root: Path
    layout: str
    samples: list[Sample]
    class_names: dict[int, str]  # index -> the name the data set gives the class
    classes_matched: str = ""  # how the data set's class names were matched to the model's
    split: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "root": str(self.root),
            "layout": self.layout,
            "split": self.split,
            "count": len(self.samples),
            "files_sha256": files_hash(self.samples, self.root),
            "classes_matched": self.classes_matched or None,
        }

    def limited(self, limit: int | None) -> DataSet:
        if limit is None or limit >= len(self.samples):
            return self
        return DataSet(self.kind, self.root, self.layout, self.samples[:limit], self.class_names,
                       self.classes_matched, self.split)  # fmt: skip


def files_hash(samples: Sequence[Sample], root: Path) -> str:
    """sha256 of the sorted list of the data set's files (paths relative to its root, not their contents)."""
    targets = [_relative(s.target, root) if isinstance(s.target, Path) else str(s.target) for s in samples]
    lines = sorted(
        f"{_relative(sample.image, root)}\t{target}" for sample, target in zip(samples, targets, strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def open_data_set(
    data: str | Path,
    labels: dict[int, str],
    segmentation: bool,
    class_map: str | Path | None = None,
    split: str | None = None,
) -> DataSet:
    """The data set at `data` for a model whose classes are `labels`; a DataSetError saying what is wrong."""
    root = Path(data)
    if not root.exists():
        raise DataSetError(f"{root} does not exist; pass a folder of class subfolders, a list file or a VOC folder")
    if segmentation:
        return _voc(root, split)
    if any((root / part).is_dir() for part in VOC_PARTS[:2]):
        raise DataSetError(f"{root} is a PASCAL VOC folder, but the model is a classifier; pass a segmentation model")
    names = ClassNames(labels, _read_class_map(class_map) if class_map else {})
    if root.is_file():
        return _list_file(root, names)
    return _class_folders(root, names)


class ClassNames:
    """Finds the model's class index for a name a data set gives."""

    def __init__(self, labels: dict[int, str], class_map: dict[str, str]) -> None:
        self.labels, self.class_map = labels, class_map
        self.by_name: dict[str, int] = {}
        for index in sorted(labels):
            label = str(labels[index])
            for name in (label, *label.split(",")):
                self.by_name.setdefault(_normal(name), index)
        # ImageNet's folders are named by WordNet id: where the model's classes are ImageNet's, in order.
        if labels_dataset([str(labels[i]) for i in sorted(labels)]) == IMAGENET:
            wnids = imagenet_wnids()
            first = len(labels) - len(wnids)  # 1 where the background class comes first
            self.by_name.update((wnid, first + i) for i, wnid in enumerate(wnids))

    def find(self, name: str) -> int | None:
        name = self.class_map.get(name, name)
        if re.fullmatch(r"\d+", name) and int(name) in self.labels:
            return int(name)
        return self.by_name.get(_normal(name))


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def _two_field_lines(path: Path, what: str, form: str, from_right: bool = False) -> Iterator[tuple[str, str]]:
    """The (first, second) fields of each line of a `what` file (blank lines and `#` comments skipped), split
    at the first whitespace (at the last with `from_right`: paths may hold spaces); a DataSetError naming
    the line that is not `form`."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataSetError(f"cannot read the {what} {path} ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1) if from_right else line.split(None, 1)
        if len(parts) != 2:
            raise DataSetError(f"{path}:{number}: a {what} line is {form}")
        yield parts[0], parts[1].strip()


def _read_class_map(path: str | Path) -> dict[str, str]:
    return dict(_two_field_lines(Path(path), "class map", "`name label` (e.g. `n01440764 tench`)"))


def _class_folders(root: Path, names: ClassNames) -> DataSet:
    folders = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise DataSetError(f"{root} holds no class subfolders; put each class's images in a folder of its own")
    found = {folder.name: names.find(folder.name) for folder in folders}
    unknown = [name for name, index in found.items() if index is None]
    if not unknown:
        matched = "class folder names matched to the model's labels" + (" (via the class map)" * bool(names.class_map))
        indices = {name: int(index) for name, index in found.items() if index is not None}
    elif len(unknown) == len(folders) and len(folders) == len(names.labels):
        matched = (
            "the model's labels name none of the class folders: folder i in sorted order is class i, as Keras' "
            "image_dataset_from_directory numbers them"
        )
        indices = {folder.name: index for index, folder in enumerate(folders)}
    else:
        shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise DataSetError(
            f"the model has no class named {shown} (a folder of {root}); name the folders by the model's labels "
            "or give a --class-map file of `folder label` lines"
        )
    suffixes = image_suffixes()
    samples = [
        Sample(path, indices[folder.name])
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in suffixes and path.is_file()
    ]
    if not samples:
        raise DataSetError(f"the class folders of {root} hold no images")
    class_names = {index: name for name, index in indices.items()}
    return DataSet(CLASSIFICATION, root, "class folders", sorted(samples, key=lambda s: s.image), class_names, matched)


def _list_file(path: Path, names: ClassNames) -> DataSet:
    samples, class_names, unknown = [], {}, set()
    for image, label in _two_field_lines(path, "list", "`image-path label`", from_right=True):
        index = names.find(label)
        if index is None:
            unknown.add(label)
            continue
        samples.append(Sample(path.parent / image, index))
        class_names.setdefault(index, label)
    if unknown:
        shown = ", ".join(sorted(unknown)[:4])
        raise DataSetError(
            f"the model has no class named {shown} (in {path}); use its labels, indices or a --class-map"
        )
    if not samples:
        raise DataSetError(f"{path} lists no images")
    matched = "list labels matched to the model's labels or indices"
    return DataSet(
        CLASSIFICATION, path.parent, "list file", sorted(samples, key=lambda s: s.image), class_names, matched
    )


def _voc(root: Path, split: str | None) -> DataSet:
    missing = [part for part in VOC_PARTS if not (root / part).is_dir()]
    if missing:
        raise DataSetError(
            f"{root} is not a PASCAL VOC folder: it lacks {', '.join(missing)}/ (a segmentation model is evaluated "
            "on JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt)"
        )
    sets = root / VOC_PARTS[2]
    available = sorted(p.stem for p in sets.glob("*.txt"))
    split = split or (DEFAULT_SPLIT if DEFAULT_SPLIT in available else available[0] if len(available) == 1 else None)
    if split not in available:
        raise DataSetError(
            f"{sets} has no split {split or DEFAULT_SPLIT}.txt (it has: {', '.join(available) or 'none'})"
        )
    ids = [line.strip() for line in (sets / f"{split}.txt").read_text().splitlines() if line.strip()]
    samples = []
    for image_id in ids:
        images = sorted((root / "JPEGImages").glob(f"{glob_escape(image_id)}.*"))
        samples.append(Sample(images[0] if images else root / "JPEGImages" / f"{image_id}.jpg",
                              root / "SegmentationClass" / f"{image_id}.png"))  # fmt: skip
    if not samples:
        raise DataSetError(f"{sets / f'{split}.txt'} lists no images")
    return DataSet(DEEPLAB, root, "pascal voc", samples, {}, split=split)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# ------------------------------------------------------------------------------------------ preprocessing
@dataclass
class Prepared:
    """One sample ready for the models: pixels CHW float32, the target (a class index, or a label map the
    size of the pixels), the image region of the pixels (height, width; the rest is padding) and, for a
    sample that could not be read, why."""

    pixels: np.ndarray
    target: int | np.ndarray
    region: tuple[int, int]
    problem: str = ""


def slim_pixels(image, size: int, settings: dict[str, Any]) -> np.ndarray:
    """slim's evaluation preprocessing: `tf.image.central_crop(0.875)`, then a bilinear resize to the size
    (cropped before converting to float: the decoding workers' time is the evaluation's bottleneck)."""
    import torch
    import torch.nn.functional as F

    width, height = image.size
    top = int((height - height * SLIM_CENTRAL_FRACTION) / 2)
    left = int((width - width * SLIM_CENTRAL_FRACTION) / 2)
    crop = torch.from_numpy(np.array(image.crop((left, top, width - left, height - top))))
    pixels = crop.float().permute(2, 0, 1)[None]  # channels_last in memory: the fast layout of the resize
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return scale(resized[0].permute(1, 2, 0).numpy(), settings)


def deeplab_pixels(image, label: np.ndarray, crop: int, settings: dict[str, Any]):
    """DeepLab's evaluation: fit the long side within `crop`, pad bottom/right to crop x crop with the mean
    pixel (the label with the ignore label). Returns (pixels CHW, label [crop, crop], (height, width))."""
    from PIL import Image

    if max(image.size) > crop:
        factor = crop / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    height, width = image.height, image.width
    array = np.full((crop, crop, 3), MEAN_PIXEL, np.float32)
    array[:height, :width] = np.asarray(image, dtype=np.float32)
    padded = np.full((crop, crop), IGNORE_LABEL, np.uint8)
    padded[:height, :width] = label
    return scale(array, settings), padded, (height, width)


def read_label_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A VOC label PNG's class ids [H, W] (palette or greyscale), matching the image's (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as label:
            if label.mode not in ("P", "L"):
                raise ImageError(f"{path} is a {label.mode} image, not a palette or greyscale label PNG")
            values = np.asarray(label, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path} (the label of an image) does not exist") from None
    except (OSError, ValueError) as error:
        raise ImageError(f"cannot read the label {path} ({error})") from None
    if values.shape[::-1] != tuple(size):
        raise ImageError(f"{path} is {values.shape[1]}x{values.shape[0]}, its image {size[0]}x{size[1]}")
    return values


class PreparedSamples:
    """The samples, decoded and prepared on access (in DataLoader workers); a sample that cannot be read
    comes back with zero pixels and the problem, so the run goes on."""

    def __init__(self, data: DataSet, preprocessing: str, size: int, settings: dict[str, Any]) -> None:
        self.samples, self.preprocessing, self.size, self.settings = data.samples, preprocessing, size, settings
        self.segmentation = data.kind == DEEPLAB

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            prepared = self._prepare(sample)
        except ImageError as error:
            blank = np.zeros((3, self.size, self.size), np.float32)
            target = np.full((self.size, self.size), IGNORE_LABEL, np.uint8) if self.segmentation else -1
            prepared = Prepared(blank, target, (0, 0), str(error))
        return {"index": index, "pixels": prepared.pixels, "target": prepared.target,
                "region": np.asarray(prepared.region), "problem": prepared.problem}  # fmt: skip

    def _prepare(self, sample: Sample) -> Prepared:
        from converter.images import preprocess

        image = open_image(sample.image)
        if self.segmentation:
            label = read_label_png(sample.target, image.size)
            pixels, label, region = deeplab_pixels(image, label, self.size, self.settings)
            return Prepared(pixels, label, region)
        if self.preprocessing == "slim":
            pixels = slim_pixels(image, self.size, self.settings)
        else:
            pixels = preprocess(image, self.settings)
        return Prepared(pixels, int(sample.target), pixels.shape[1:])
