"""Which model a source holds (kind, depth multiplier, classes), inferred from its tensors and checked
against what the user said (--depth, --size), the zoo file name and what the source itself says."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np

from converter.errors import VariantError
from converter.pipeline.table import TRANSFORMS, rules_for
from converter.vocabulary import ARCHITECTURES, BACKBONE, CLASSIFICATION, DEEPLAB, folder_name
from mobilenet_torch.architecture import state_shapes
from mobilenet_torch.configuration import MobileNetV2Config

DEPTHS = {CLASSIFICATION: (1.4, 1.3, 1.0, 0.75, 0.5, 0.35), DEEPLAB: (1.0, 0.5)}
DEPTHS[BACKBONE] = DEPTHS[CLASSIFICATION]
DEEPLAB_CROP = 513  # the zoo's DeepLab graphs run on a 513x513 crop
MIN_SIZE = 32
# A tensor only that kind has; a source with neither head marker but the final conv is a backbone.
KIND_MARKERS = {
    CLASSIFICATION: "MobilenetV2/Logits/Conv2d_1c_1x1/weights",
    DEEPLAB: "logits/semantic/weights",
}
BACKBONE_MARKER = "MobilenetV2/Conv_1/weights"
ZOO_NAME = re.compile(r"mobilenet_v2_(?P<depth>\d+(?:\.\d+)?)_(?P<size>\d+)")
# Where the image size came from, recorded in conversion.json.
SIZE_FROM_FLAG, SIZE_FROM_NAME, SIZE_FROM_SOURCE, SIZE_CROP, SIZE_ASSUMED = (
    "--size",
    "zoo file name",
    "the source",
    "DeepLab crop",
    "assumed",
)


@dataclass(frozen=True)
class Variant:
    kind: str
    depth: float
    size: int
    num_labels: int
    output_stride: int = 32
    size_from: str = SIZE_FROM_FLAG

    @property
    def name(self) -> str:
        return folder_name(self.kind, self.depth, self.size, self.output_stride)

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.kind]

    def config(
        self, drop_background: bool = False, avg_pool: str = "global", labels: tuple[str, ...] | None = None
    ) -> MobileNetV2Config:
        """The transformers-compatible config of this variant (class names from `labels` if given)."""
        names = list(labels) if labels is not None else class_names(self.kind, self.num_labels)
        names = names[1 if drop_background else 0 :]
        # DeepLab's depth-0.5 model rounds channels to multiples of 1, not 8.
        divisible_by = 1 if self.kind == DEEPLAB and self.depth < 1 else 8
        return MobileNetV2Config(
            image_size=self.size,
            depth_multiplier=self.depth,
            depth_divisible_by=divisible_by,
            min_depth=divisible_by,
            output_stride=self.output_stride,
            id2label=dict(enumerate(names)),
            classifier_dropout_prob=0.1 if self.kind == DEEPLAB else 0.8,
            avg_pool=avg_pool,
        )


def class_names(kind: str, count: int) -> list[str]:
    """ImageNet (0 = background) or PASCAL VOC names when the count fits, generic names otherwise."""
    if kind == BACKBONE:
        return []
    filename = "pascal_voc_labels.txt" if kind == DEEPLAB else "imagenet_labels.txt"
    names = resources.files("converter").joinpath("data", filename).read_text().splitlines()
    return names if len(names) == count else [f"LABEL_{i}" for i in range(count)]


def detect_kind(names: set[str]) -> str:
    kinds = [kind for kind, marker in KIND_MARKERS.items() if marker in names]
    if not kinds and BACKBONE_MARKER in names:
        return BACKBONE
    if len(kinds) != 1:
        raise VariantError(
            "not a MobileNetV2 slim or DeepLab model: expected exactly one of "
            f"{', '.join(KIND_MARKERS.values())} (or {BACKBONE_MARKER} alone, a backbone) among its "
            f"{len(names)} tensors"
        )
    return kinds[0]


def expected_shapes(variant: Variant, drop_background: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of the PyTorch model for this variant (torch-free arithmetic)."""
    return state_shapes(variant.config(drop_background), variant.architecture)


def detect_variant(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    depth: float | None = None,
    size: int | None = None,
    output_stride: int | None = None,
    source_name: str = "",
    source_size: int | None = None,
) -> Variant:
    """Infer kind, depth and classes from tensor shapes; check them against flags, the file name and the
    input size the source itself fixes (`source_size`)."""
    kind = detect_kind(set(shapes))
    head = shapes.get(KIND_MARKERS.get(kind, ""), ())
    num_labels = int(head[-1]) if head else 0
    if output_stride is not None and kind != DEEPLAB and output_stride != 32:
        raise VariantError(f"--output-stride {output_stride} applies to DeepLab models, not classifiers")
    stride = output_stride or (8 if kind == DEEPLAB else 32)

    candidates = DEPTHS[kind]
    matches = [d for d in candidates if _shapes_match(shapes, Variant(kind, d, 224, num_labels, stride))]
    if not matches:
        raise VariantError(
            f"tensor shapes match no {kind} MobileNetV2 of depth {', '.join(map(str, candidates))}; "
            "the source is not one of the supported models"
        )
    found = matches[0]
    from_name = ZOO_NAME.search(source_name) if kind != DEEPLAB else None
    if depth is not None and depth != found:
        raise VariantError(f"--depth {depth} does not match the source, which is depth {found}")
    if from_name and float(from_name["depth"]) != found:
        raise VariantError(f"file name says depth {from_name['depth']} but the tensors are depth {found}")
    final_size, size_from = _image_size(kind, size, int(from_name["size"]) if from_name else None, source_size)
    if final_size < MIN_SIZE:
        raise VariantError(f"--size {final_size} is too small: MobileNetV2 needs at least {MIN_SIZE} pixels")
    return Variant(kind, found, final_size, num_labels, stride, size_from)


def _image_size(kind: str, flag: int | None, from_name: int | None, from_source: int | None) -> tuple[int, str]:
    """The image size and where it came from; sources that disagree are an error."""
    said = [
        (value, origin) for value, origin in ((from_name, SIZE_FROM_NAME), (from_source, SIZE_FROM_SOURCE)) if value
    ]
    for value, origin in said:
        if flag is not None and flag != value:
            raise VariantError(f"--size {flag} does not match the source's {origin}, which says {value}")
    if flag is not None:
        return flag, SIZE_FROM_FLAG
    if said:
        return said[0]
    if kind == DEEPLAB:
        return DEEPLAB_CROP, SIZE_CROP
    return 224, SIZE_ASSUMED


def _shapes_match(shapes: Mapping[str, tuple[int, ...]], variant: Variant) -> bool:
    expected = expected_shapes(variant)
    for rule in rules_for(variant.kind):
        shape = shapes.get(rule.tf_name)
        if shape is None or rule.torch_name not in expected:
            return False
        # A zero-stride stand-in lets the layout transforms run on a shape alone.
        transformed = TRANSFORMS[rule.transform](np.broadcast_to(np.float32(0), shape)).shape
        if tuple(transformed) != expected[rule.torch_name]:
            return False
    return True
