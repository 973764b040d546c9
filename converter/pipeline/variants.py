"""Which model a checkpoint holds (kind, depth multiplier, classes), inferred from its tensors and
checked against what the user said (--depth, --size) and the zoo file name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np

from converter.errors import VariantError
from converter.pipeline.table import CLASSIFICATION, DEEPLAB, TRANSFORMS, rules_for
from mobilenet_torch.configuration import MobileNetV2Config

CLASSIFICATION_DEPTHS = (1.4, 1.3, 1.0, 0.75, 0.5, 0.35)
DEEPLAB_DEPTHS = (1.0, 0.5)
DEFAULT_SIZE = {CLASSIFICATION: 224, DEEPLAB: 513}
MIN_SIZE = 32
KIND_MARKERS = {
    CLASSIFICATION: "MobilenetV2/Logits/Conv2d_1c_1x1/weights",
    DEEPLAB: "logits/semantic/weights",
}
ZOO_NAME = re.compile(r"mobilenet_v2_(?P<depth>\d+(?:\.\d+)?)_(?P<size>\d+)")


@dataclass(frozen=True)
class Variant:
    kind: str
    depth: float
    size: int
    num_labels: int
    output_stride: int = 32

    @property
    def name(self) -> str:
        if self.kind == CLASSIFICATION:
            return f"mobilenet_v2_{self.depth}_{self.size}"
        return f"deeplabv3_mobilenet_v2_{self.depth}_{self.size}_os{self.output_stride}"

    def config(self, drop_background: bool = False, avg_pool: str = "global") -> MobileNetV2Config:
        """The transformers-compatible config of this variant."""
        labels = class_names(self.kind, self.num_labels)[1 if drop_background else 0 :]
        # DeepLab's depth-0.5 model rounds channels to multiples of 1, not 8.
        divisible_by = 1 if self.kind == DEEPLAB and self.depth < 1 else 8
        return MobileNetV2Config(
            image_size=self.size,
            depth_multiplier=self.depth,
            depth_divisible_by=divisible_by,
            min_depth=divisible_by,
            output_stride=self.output_stride,
            id2label=dict(enumerate(labels)),
            classifier_dropout_prob=0.8 if self.kind == CLASSIFICATION else 0.1,
            avg_pool=avg_pool,
        )


def class_names(kind: str, count: int) -> list[str]:
    """ImageNet (0 = background) or PASCAL VOC names when the count fits, generic names otherwise."""
    filename = "imagenet_labels.txt" if kind == CLASSIFICATION else "pascal_voc_labels.txt"
    names = resources.files("converter").joinpath("data", filename).read_text().splitlines()
    return names if len(names) == count else [f"LABEL_{i}" for i in range(count)]


def detect_kind(names: set[str]) -> str:
    kinds = [kind for kind, marker in KIND_MARKERS.items() if marker in names]
    if len(kinds) != 1:
        raise VariantError(
            "not a MobileNetV2 slim or DeepLab checkpoint: expected exactly one of "
            f"{', '.join(KIND_MARKERS.values())} among its {len(names)} tensors"
        )
    return kinds[0]


def expected_shapes(variant: Variant, drop_background: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of the PyTorch model for this variant (built on the meta device)."""
    import torch

    from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation

    cls = MobileNetV2ForImageClassification if variant.kind == CLASSIFICATION else MobileNetV2ForSemanticSegmentation
    with torch.device("meta"):
        model = cls(variant.config(drop_background))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def detect_variant(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    depth: float | None = None,
    size: int | None = None,
    output_stride: int | None = None,
    source_name: str = "",
) -> Variant:
    """Infer kind, depth and classes from tensor shapes; check them against flags and the file name."""
    kind = detect_kind(set(shapes))
    head = shapes[KIND_MARKERS[kind]]
    num_labels = int(head[-1]) if head else 0
    if output_stride is not None and kind == CLASSIFICATION and output_stride != 32:
        raise VariantError(f"--output-stride {output_stride} applies to DeepLab checkpoints, not classifiers")
    stride = output_stride or (8 if kind == DEEPLAB else 32)

    candidates = CLASSIFICATION_DEPTHS if kind == CLASSIFICATION else DEEPLAB_DEPTHS
    matches = [d for d in candidates if _shapes_match(shapes, Variant(kind, d, 224, num_labels, stride))]
    if not matches:
        raise VariantError(
            f"tensor shapes match no {kind} MobileNetV2 of depth {', '.join(map(str, candidates))}; "
            "the checkpoint is not one of the supported models"
        )
    found = matches[0]
    from_name = ZOO_NAME.search(source_name) if kind == CLASSIFICATION else None
    if depth is not None and depth != found:
        raise VariantError(f"--depth {depth} does not match the checkpoint, which is depth {found}")
    if from_name and float(from_name["depth"]) != found:
        raise VariantError(f"file name says depth {from_name['depth']} but the tensors are depth {found}")
    name_size = int(from_name["size"]) if from_name else None
    if size is not None and name_size is not None and size != name_size:
        raise VariantError(f"--size {size} does not match the checkpoint's zoo name, which says {name_size}")
    final_size = size or name_size or DEFAULT_SIZE[kind]
    if final_size < MIN_SIZE:
        raise VariantError(f"--size {final_size} is too small: MobileNetV2 needs at least {MIN_SIZE} pixels")
    return Variant(kind, found, final_size, num_labels, stride)


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
