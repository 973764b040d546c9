"""Images in, model inputs out: transformers' `MobileNetV2ImageProcessor` steps in numpy (Pillow reads).

Shared by `predict-mobilenet`, `eval-mobilenet` and the verifier, driven by a folder's `preprocessor_config.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ImageError

EXIF_ORIENTATION = 0x0112


def image_suffixes() -> frozenset[str]:
    """The file suffixes of the formats Pillow decodes (its stubs, which need a handler, left out)."""
    from PIL import Image, ImageFile

    Image.init()
    return frozenset(
        suffix
        for suffix, format in Image.registered_extensions().items()
        if format in Image.OPEN
        and not (isinstance(Image.OPEN[format][0], type) and issubclass(Image.OPEN[format][0], ImageFile.StubImageFile))
    )


def open_image(path: str | Path):
    """An RGB Pillow image upright as its EXIF orientation says (as transformers' `load_image` does), or an
    `ImageError` saying why not. 16-bit images keep their 8 high bits (Pillow's own conversion would clip
    them to white)."""
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise ImageError("reading images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # transposing copies: only where needed
                image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey
                values = np.asarray(image, dtype=np.int64)
                if image.mode.startswith("I;16") or values.max(initial=0) > 255:
                    values = values >> 8
                image = Image.fromarray(values.clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageError(f"cannot read the image {path} ({error})") from None


def preprocess(image, preprocessing: dict[str, Any], crop: bool = True) -> np.ndarray:
    """CHW float32 array in [-1, 1], as `MobileNetV2ImageProcessor` makes it (resize, crop, rescale,
    normalize), from a Pillow RGB image."""
    from PIL import Image

    if preprocessing.get("do_resize", True):
        shortest = int((preprocessing.get("size") or {}).get("shortest_edge", 256))
        width, height = image.size
        short, long = min(width, height), max(width, height)
        other = int(shortest * long / short)
        new_size = (shortest, other) if width <= height else (other, shortest)
        image = image.resize(new_size, Image.Resampling(int(preprocessing.get("resample", 2))))
    array = np.asarray(image, dtype=np.float32)
    if crop and preprocessing.get("do_center_crop", True):
        crop_size = preprocessing.get("crop_size") or {}
        array = _center_crop(array, int(crop_size.get("height", 224)), int(crop_size.get("width", 224)))
    return scale(array, preprocessing)


def scale(array: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """HWC 0..255 values rescaled and normalized as the preprocessor config says ([-1, 1] by default), as CHW
    float32."""
    if preprocessing.get("do_rescale", True):
        array = array * float(preprocessing.get("rescale_factor", 1 / 255))
    if preprocessing.get("do_normalize", True):
        mean = np.asarray(preprocessing.get("image_mean", [0.5] * 3), dtype=np.float32)
        std = np.asarray(preprocessing.get("image_std", [0.5] * 3), dtype=np.float32)
        array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop; pads with zeros (black) where the image is smaller, as transformers does."""
    h, w = array.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), array.shape[2]), array.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = array
        array, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return array[top : top + height, left : left + width]
