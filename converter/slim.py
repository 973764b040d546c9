"""The slim MobileNetV2 as every reader yields it, defined once: its conv layers (TF scope, PyTorch module,
weight variable, layout transform), their BatchNorm variables, the heads, and `detect_variant`, which tells
from tensor shapes which model a source holds (kind, depth multiplier, classes), checked against what the
user said (--depth, --size), the zoo file name and what the source itself says.

`rules_for(kind)` expands the rows into flat `Rule`s; `converter.pipeline.table` applies them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from converter import data
from converter.errors import VariantError
from converter.vocabulary import ARCHITECTURE_OF_KIND, BACKBONE, CLASSIFICATION, DEEPLAB, folder_name
from mobilenet_torch.architecture import ARCHITECTURES as MODEL_LAYOUTS
from mobilenet_torch.architecture import HIDDEN_CLASSIFIER, state_shapes
from mobilenet_torch.configuration import MobileNetV2Config

NUM_BLOCKS = 16
# The backbone rows name modules as the classification and segmentation models hold them; a backbone
# model (MobileNetV2Model) holds them at its top level, without this prefix.
BACKBONE_MODULE_PREFIX = "mobilenet_v2."
BACKBONE_KINDS = (CLASSIFICATION, DEEPLAB, BACKBONE)

# Layout changes, one small function per case.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # [h, w, in, out] -> [out, in, h, w]
    "depthwise": lambda a: a.transpose(2, 3, 0, 1),  # [h, w, in, 1] -> [in, 1, h, w]
    "linear": lambda a: a.reshape(a.shape[-2:]).T,  # 1x1 conv [1, 1, in, out] -> Linear [out, in]
    "copy": lambda a: a,
}

# (TF scope, PyTorch module, weight variable, transform, model kinds). "{k}" runs over blocks 1..16
# and "{i}" is k - 1, transformers' index of that block.
LAYERS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("MobilenetV2/Conv", "mobilenet_v2.conv_stem.first_conv", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv/depthwise", "mobilenet_v2.conv_stem.conv_3x3", "depthwise_weights", "depthwise", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv/project", "mobilenet_v2.conv_stem.reduce_1x1", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv_{k}/expand", "mobilenet_v2.layer.{i}.expand_1x1", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv_{k}/depthwise", "mobilenet_v2.layer.{i}.conv_3x3", "depthwise_weights", "depthwise", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv_{k}/project", "mobilenet_v2.layer.{i}.reduce_1x1", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/Conv_1", "mobilenet_v2.conv_1x1", "weights", "conv", (CLASSIFICATION, BACKBONE)),
    ("image_pooling", "segmentation_head.conv_pool", "weights", "conv", (DEEPLAB,)),
    ("aspp0", "segmentation_head.conv_aspp", "weights", "conv", (DEEPLAB,)),
    ("concat_projection", "segmentation_head.conv_projection", "weights", "conv", (DEEPLAB,)),
)  # fmt: skip

# The variables of a conv + BatchNorm layer besides its weights: (TF suffix, PyTorch suffix).
LAYER_PARAMS = (
    ("BatchNorm/gamma", "normalization.weight"),
    ("BatchNorm/beta", "normalization.bias"),
    ("BatchNorm/moving_mean", "normalization.running_mean"),
    ("BatchNorm/moving_variance", "normalization.running_var"),
)
# Classifiers: (TF variable, PyTorch tensor, transform, kind). Their class axis is axis 0 after the
# transform, which is where --drop-background removes the background class.
HEADS = (
    ("MobilenetV2/Logits/Conv2d_1c_1x1/weights", "classifier.weight", "linear", CLASSIFICATION),
    ("MobilenetV2/Logits/Conv2d_1c_1x1/biases", "classifier.bias", "copy", CLASSIFICATION),
    ("logits/semantic/weights", "segmentation_head.classifier.convolution.weight", "conv", DEEPLAB),
    ("logits/semantic/biases", "segmentation_head.classifier.convolution.bias", "copy", DEEPLAB),
)


# The Dense layers a Keras head has ahead of its classifier (`MobileNetV2Config.classifier_layers`), "{j}"
# running over them: (TF variable, PyTorch tensor, transform). Slim has none; the names follow its 1x1 head.
HIDDEN_HEADS = (
    ("MobilenetV2/Logits/Dense_{j}/weights", f"{HIDDEN_CLASSIFIER}.{{j}}.weight", "linear"),
    ("MobilenetV2/Logits/Dense_{j}/biases", f"{HIDDEN_CLASSIFIER}.{{j}}.bias", "copy"),
)
HIDDEN_HEAD_WEIGHTS = re.compile(r"^MobilenetV2/Logits/Dense_(\d+)/weights$")
MAX_HEAD_LAYERS = 8  # "a short stack": more Dense layers are not a MobileNetV2 classifier


@dataclass(frozen=True)
class Rule:
    tf_name: str
    torch_name: str
    transform: str
    is_classifier: bool = False


def expand_blocks(template: str) -> list[dict[str, int]]:
    """Substitutions for a template: every block if it names one, else none."""
    if "{k}" not in template:
        return [{}]
    return [{"k": k, "i": k - 1, "n": k + 2} for k in range(1, NUM_BLOCKS + 1)]


def conv_layers(kind: str) -> list[tuple[str, str, str, str]]:
    """(TF scope, PyTorch module, weight variable, transform) of every conv + BatchNorm layer."""
    return [
        (scope.format(**values), module_path(kind, module.format(**values)), weight, transform)
        for scope, module, weight, transform, kinds in LAYERS
        if kind in kinds
        for values in expand_blocks(scope)
    ]


def module_path(kind: str, module: str) -> str:
    """`module` as the model class of `kind` names it (a backbone model has no `mobilenet_v2.` prefix)."""
    if not module.startswith(BACKBONE_MODULE_PREFIX):
        return module
    return MODEL_LAYOUTS[ARCHITECTURE_OF_KIND[kind]][0] + module.removeprefix(BACKBONE_MODULE_PREFIX)


@functools.cache  # detection, mapping and the record each ask for it
def rules_for(kind: str, hidden_layers: int = 0) -> tuple[Rule, ...]:
    """The flat table for one model kind, with `hidden_layers` Dense layers ahead of the classifier."""
    rules = []
    for tf_scope, torch_module, weight, transform in conv_layers(kind):
        rules.append(Rule(f"{tf_scope}/{weight}", f"{torch_module}.convolution.weight", transform))
        rules += [Rule(f"{tf_scope}/{tf}", f"{torch_module}.{pt}", "copy") for tf, pt in LAYER_PARAMS]
    rules += [
        Rule(tf.format(j=j), pt.format(j=j), transform)
        for j in range(hidden_layers)
        for tf, pt, transform in HIDDEN_HEADS
    ]
    rules += [Rule(tf, pt, transform, is_classifier=True) for tf, pt, transform, k in HEADS if k == kind]
    return tuple(rules)


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
# Zoo names (mobilenet_v2_1.0_224) and TF Hub's (mobilenet_v2_100_224: depth x 100).
ZOO_NAME = re.compile(r"mobilenet_v2_(?:(?P<depth>\d\.\d+)|(?P<depth100>\d{3}))_(?P<size>\d+)")
# Where the image size came from, recorded in conversion.json.
SIZE_FROM_FLAG, SIZE_FROM_NAME, SIZE_FROM_SOURCE, SIZE_CROP, SIZE_ASSUMED = (
    "--size",
    "zoo file name",
    "source's input shape",
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
    # The Dense layers ahead of the classifier, as (units, activation) (`MobileNetV2Config.classifier_layers`).
    hidden_layers: tuple[tuple[int, str], ...] = ()
    # How each stride-2 conv pads (`MobileNetV2Config.strided_padding`); None: TF's SAME.
    strided_padding: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return folder_name(self.kind, self.depth, self.size, self.output_stride)

    @property
    def architecture(self) -> str:
        return ARCHITECTURE_OF_KIND[self.kind]

    def config(
        self, background: str | None = None, avg_pool: str = "global", labels: tuple[str, ...] | None = None
    ) -> MobileNetV2Config:
        """The transformers-compatible config of this variant (class names from `labels` if given), with
        the background class dropped or added (`background`, see `converter.pipeline.table.edit_background`)."""
        names = list(labels) if labels is not None else class_names(self.kind, self.num_labels)
        names = names[1:] if background == "drop" else ["background", *names] if background == "add" else names
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
            classifier_layers=[{"units": u, "activation": a} for u, a in self.hidden_layers] or None,
            strided_padding=list(self.strided_padding) if self.strided_padding else None,
        )


#: The datasets whose class names the toolkit knows (Hub dataset ids), and the file that lists them.
IMAGENET, PASCAL_VOC = "imagenet-1k", "pascal-voc"
LABEL_FILES = {IMAGENET: "imagenet_labels.txt", PASCAL_VOC: "pascal_voc_labels.txt"}


def dataset_names(dataset: str) -> list[str]:
    """The class names of `dataset` (ImageNet's 1001, background first; PASCAL VOC's 21)."""
    return data.read_text(LABEL_FILES[dataset]).splitlines()


def imagenet_wnids() -> list[str]:
    """ImageNet's 1000 WordNet ids (`n01440764`), in class order: the i-th is class i of a 1000-class model,
    i + 1 of a 1001-class one (ILSVRC's synset list, which slim's and Keras' class numbers follow)."""
    return data.read_text("imagenet_wnids.txt").split()


def class_names(kind: str, count: int) -> list[str]:
    """ImageNet (1001 with background at 0, or the 1000 without) or PASCAL VOC names when the count
    fits, generic names otherwise."""
    if kind == BACKBONE:
        return []
    names = dataset_names(PASCAL_VOC if kind == DEEPLAB else IMAGENET)
    if kind == CLASSIFICATION and count == len(names) - 1:
        return names[1:]
    return names if len(names) == count else [f"LABEL_{i}" for i in range(count)]


def labels_dataset(labels: Sequence[str]) -> str | None:
    """The dataset whose class names `labels` are, in order (ImageNet with or without its background
    class), or None where they are another set."""
    for dataset in LABEL_FILES:
        names = dataset_names(dataset)
        if list(labels) in (names, names[1:] if dataset == IMAGENET else None):
            return dataset
    return None


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


def expected_shapes(variant: Variant, background: str | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of the PyTorch model for this variant (torch-free arithmetic)."""
    return state_shapes(variant.config(background), variant.architecture)


def detect_variant(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    depth: float | None = None,
    size: int | None = None,
    output_stride: int | None = None,
    source_name: str = "",
    source_size: int | None = None,
    hidden_activations: tuple[str, ...] = (),
    strided_padding: tuple[str, ...] | None = None,
) -> Variant:
    """Infer kind, depth, classes and the Dense layers ahead of the classifier from tensor shapes (their
    activations, which shapes do not show, from `hidden_activations`); check them against flags, the file
    name and the input size the source itself fixes (`source_size`). `strided_padding` is the source's
    padding of its stride-2 convs, which shapes do not show either."""
    kind = detect_kind(set(shapes))
    hidden = _hidden_layers(shapes, hidden_activations)
    head = shapes.get(KIND_MARKERS.get(kind, ""), ())
    num_labels = int(head[-1]) if head else 0
    if output_stride is not None and kind != DEEPLAB and output_stride != 32:
        raise VariantError(f"--output-stride {output_stride} applies to DeepLab models, not classifiers")
    stride = output_stride or (8 if kind == DEEPLAB else 32)

    candidates = DEPTHS[kind]
    variants = (Variant(kind, d, 224, num_labels, stride, hidden_layers=hidden) for d in candidates)
    found = next((variant.depth for variant in variants if _shapes_match(shapes, variant)), None)
    if found is None:
        raise VariantError(
            f"tensor shapes match no {kind} MobileNetV2 of depth {', '.join(map(str, candidates))}; "
            "the source is not one of the supported models"
        )
    from_name = ZOO_NAME.search(source_name) if kind != DEEPLAB else None
    if depth is not None and depth != found:
        raise VariantError(f"--depth {depth} does not match the source, which is depth {found}")
    if from_name and _name_depth(from_name) != found:
        raise VariantError(f"file name says depth {_name_depth(from_name)} but the tensors are depth {found}")
    final_size, size_from = _image_size(kind, size, int(from_name["size"]) if from_name else None, source_size)
    if final_size < MIN_SIZE:
        raise VariantError(f"--size {final_size} is too small: MobileNetV2 needs at least {MIN_SIZE} pixels")
    return Variant(kind, found, final_size, num_labels, stride, size_from, hidden, strided_padding)


def _hidden_layers(shapes: Mapping[str, tuple[int, ...]], activations: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """(units, activation) of each hidden Dense layer the source holds (`HIDDEN_HEADS`)."""
    found = sorted(int(m[1]) for name in shapes if (m := HIDDEN_HEAD_WEIGHTS.match(name)))
    if found != list(range(len(found))) or len(activations) != len(found):
        raise VariantError(
            f"the source holds hidden classifier layers {found} with activations {list(activations)}: "
            "the head's Dense layers must be numbered from 0, each with its activation"
        )
    return tuple((int(shapes[HIDDEN_HEADS[0][0].format(j=j)][-1]), activations[j]) for j in found)


def _name_depth(match: re.Match) -> float:
    return float(match["depth"]) if match["depth"] else int(match["depth100"]) / 100


def _image_size(kind: str, flag: int | None, from_name: int | None, from_source: int | None) -> tuple[int, str]:
    """The image size and where it came from (the input shape the source fixes before its file name);
    a --size that disagrees with either is an error."""
    said = [
        (value, origin) for value, origin in ((from_source, SIZE_FROM_SOURCE), (from_name, SIZE_FROM_NAME)) if value
    ]
    for value, origin in said:
        if flag is not None and flag != value:
            raise VariantError(f"--size {flag} does not match the {origin}, which says {value}; leave --size out")
    if flag is not None:
        return flag, SIZE_FROM_FLAG
    if said:
        return said[0]
    if kind == DEEPLAB:
        return DEEPLAB_CROP, SIZE_CROP
    return 224, SIZE_ASSUMED


def _shapes_match(shapes: Mapping[str, tuple[int, ...]], variant: Variant) -> bool:
    expected = expected_shapes(variant)
    for rule in rules_for(variant.kind, len(variant.hidden_layers)):
        shape = shapes.get(rule.tf_name)
        if shape is None or rule.torch_name not in expected:
            return False
        # A zero-stride stand-in lets the layout transforms run on a shape alone.
        transformed = TRANSFORMS[rule.transform](np.broadcast_to(np.float32(0), shape)).shape
        if tuple(transformed) != expected[rule.torch_name]:
            return False
    return True
