"""The architecture as data, torch-free: slim's block table, the channel arithmetic, and the name and
shape of every tensor of each model class (what the converter checks a conversion against without
importing torch; a test proves it equals the models' own state dicts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .configuration import SAME_PADDING, MobileNetV2Config, expanded_channels, scaled_channels

STEM_CHANNELS = 32
STEM_OUT_CHANNELS = 16
LAST_CHANNELS = 1280
HEAD_CHANNELS = 256
HEAD_NORM_EPS = 1e-5

# slim's V2_DEF after the stem: (expansion, output channels, stride) for expanded_conv_1..16. The models
# expand every block by `config.expand_ratio`, as transformers does (6, slim's expansion, by default).
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)  # fmt: skip

BACKBONE_PREFIX = "mobilenet_v2."  # where the wrapper models keep the backbone
HIDDEN_CLASSIFIER = "classifier_hidden"  # the module list of Dense layers ahead of `classifier`
# Model class -> (prefix of the backbone's tensors, has the final 1x1 conv, head).
ARCHITECTURES = {
    "MobileNetV2Model": ("", True, None),
    "MobileNetV2ForImageClassification": (BACKBONE_PREFIX, True, "classifier"),
    "MobileNetV2ForSemanticSegmentation": (BACKBONE_PREFIX, False, "deeplab"),
}


class Step(NamedTuple):
    """One step of the walk of the backbone: its module (path inside the backbone, transformers' names),
    whether it is an inverted residual block (expand, depthwise, project) or a lone conv, and the slim
    endpoints of its output and, for the 16 blocks, of its expansion."""

    module: str
    block: bool
    endpoint: str
    expansion_endpoint: str | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Its endpoints in network order."""
        return (self.expansion_endpoint, self.endpoint) if self.expansion_endpoint else (self.endpoint,)


def backbone_steps(final_conv: bool = True) -> tuple[Step, ...]:
    """The one walk of the network that every model (float, integer, fake-quant) and the shape table
    follow: the stem conv (layer_1), the stem block (layer_2), the 16 blocks (layer_3..layer_18) and,
    unless excluded (DeepLab has none), the final 1x1 conv (layer_19)."""
    steps = [Step("conv_stem.first_conv", False, "layer_1"), Step("conv_stem", True, "layer_2")]
    for i in range(len(BLOCKS)):
        endpoint = f"layer_{i + 3}"
        steps.append(Step(f"layer.{i}", True, endpoint, f"{endpoint}/expansion_output"))
    if final_conv:
        steps.append(Step("conv_1x1", False, "layer_19"))
    return tuple(steps)


def final_conv_channels(config: MobileNetV2Config) -> int:
    """1280 for depth <= 1 ("finegrained" output), scaled above it (1792 at depth 1.4)."""
    if config.finegrained_output and config.depth_multiplier < 1.0:
        return LAST_CHANNELS
    return scaled_channels(config, LAST_CHANNELS)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) along one axis of length `size`."""
    effective_kernel = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


def bottom_right_padding(kernel: int) -> tuple[int, int]:
    """Keras' fixed padding (before, after) of a strided conv, one more after than before at every size
    (`BOTTOM_RIGHT_PADDING`): (0, 1) for a 3x3 kernel."""
    return kernel // 2 - 1, kernel // 2


def block_schedule(config: MobileNetV2Config) -> list[tuple[int, int]]:
    """(stride, dilation) of each block: stride is traded for dilation past `output_stride`, as slim does."""
    current_stride, rate, schedule = 2, 1, []
    for _, _, stride in BLOCKS:
        if current_stride == config.output_stride:
            schedule.append((1, rate))
            rate *= stride
        else:
            schedule.append((stride, 1))
            current_stride *= stride
    return schedule


def strided_conv_count(config: MobileNetV2Config) -> int:
    """The stride-2 convs: the stem conv and the blocks that keep a stride (`block_schedule`)."""
    return 1 + sum(stride > 1 for stride, _ in block_schedule(config))


def strided_paddings(config: MobileNetV2Config) -> list[str]:
    """How each stride-2 conv pads, in network order (`config.strided_padding`; TF's SAME where it is None)."""
    return list(config.strided_padding or [SAME_PADDING] * strided_conv_count(config))


def pads_as_same(config: MobileNetV2Config, height: int, width: int) -> bool:
    """Whether the stride-2 convs pad as TF's SAME at this input size: a "bottom_right" conv does so where
    its input is even (with (0, 1) TF's SAME pads an even side the same way)."""
    sizes = [height, width]
    for padding in strided_paddings(config):
        if padding != SAME_PADDING and any(n % 2 for n in sizes):
            return False
        sizes = [-(-n // 2) for n in sizes]
    return True


def block_channels(config: MobileNetV2Config) -> list[tuple[int, int, int]]:
    """(in, expanded, out) channels of the stem block and the 16 blocks after it. The stem block expands
    (by a 1x1 conv keeping its width) only when `config.first_layer_is_expansion` is false; every other
    block always expands, even to its own width, as in transformers."""
    stem = scaled_channels(config, STEM_CHANNELS)
    rows = [(stem, stem, scaled_channels(config, STEM_OUT_CHANNELS))]
    for _, out_channels, _ in BLOCKS:
        in_channels = rows[-1][2]
        expanded = expanded_channels(config, in_channels, config.expand_ratio)
        rows.append((in_channels, expanded, scaled_channels(config, out_channels)))
    return rows


def block_expands(config: MobileNetV2Config, step: Step) -> bool:
    """Whether the block `step` has an expansion conv (see `block_channels`)."""
    return step.module != "conv_stem" or not config.first_layer_is_expansion


def hidden_classifier_layers(config: MobileNetV2Config) -> list[tuple[int, str]]:
    """(units, activation) of the Dense layers ahead of `classifier` (`config.classifier_layers`)."""
    return [(layer["units"], layer["activation"]) for layer in config.classifier_layers or ()]


def _conv_layer(module: str, in_channels: int, out_channels: int, kernel: int, depthwise: bool = False):
    shapes = {f"{module}.convolution.weight": (out_channels, 1 if depthwise else in_channels, kernel, kernel)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{module}.normalization.{name}"] = (out_channels,)
    shapes[f"{module}.normalization.num_batches_tracked"] = ()
    return shapes


def state_shapes(config: MobileNetV2Config, architecture: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of `architecture` (a model class name)."""
    prefix, final_conv, head = ARCHITECTURES[architecture]
    rows = block_channels(config)
    stem = rows[0][0]
    shapes = _conv_layer(f"{prefix}conv_stem.first_conv", config.num_channels, stem, 3)
    blocks = [step for step in backbone_steps(final_conv) if step.block]
    for step, (in_channels, expanded, out_channels) in zip(blocks, rows, strict=True):
        module = prefix + step.module
        if block_expands(config, step):
            shapes.update(_conv_layer(f"{module}.expand_1x1", in_channels, expanded, 1))
        shapes.update(_conv_layer(f"{module}.conv_3x3", expanded, expanded, 3, depthwise=True))
        shapes.update(_conv_layer(f"{module}.reduce_1x1", expanded, out_channels, 1))
    features = rows[-1][2]
    if final_conv:
        features, last = final_conv_channels(config), features
        shapes.update(_conv_layer(f"{prefix}conv_1x1", last, features, 1))
    if head == "classifier":
        for j, (units, _) in enumerate(hidden_classifier_layers(config)):
            shapes[f"{HIDDEN_CLASSIFIER}.{j}.weight"] = (units, features)
            shapes[f"{HIDDEN_CLASSIFIER}.{j}.bias"] = (units,)
            features = units
        shapes["classifier.weight"] = (config.num_labels, features)
        shapes["classifier.bias"] = (config.num_labels,)
    elif head == "deeplab":
        shapes.update(_conv_layer("segmentation_head.conv_pool", features, HEAD_CHANNELS, 1))
        shapes.update(_conv_layer("segmentation_head.conv_aspp", features, HEAD_CHANNELS, 1))
        shapes.update(_conv_layer("segmentation_head.conv_projection", 2 * HEAD_CHANNELS, HEAD_CHANNELS, 1))
        shapes["segmentation_head.classifier.convolution.weight"] = (config.num_labels, HEAD_CHANNELS, 1, 1)
        shapes["segmentation_head.classifier.convolution.bias"] = (config.num_labels,)
    return shapes


# transformers' segmentation model builds (and runs, uselessly) a final 1x1 conv that DeepLab lacks.
PLACEHOLDER_PREFIX = f"{BACKBONE_PREFIX}conv_1x1."
_PLACEHOLDER_FILL = {"normalization.weight": 1.0, "normalization.running_var": 1.0}


def placeholder_arrays(config: MobileNetV2Config) -> dict[str, np.ndarray]:
    """Inert tensors for that conv (zero weights, identity BatchNorm statistics) so the folder loads there."""
    shapes = state_shapes(config, "MobileNetV2ForImageClassification")
    return {
        name: np.full(
            shape,
            _PLACEHOLDER_FILL.get(name.removeprefix(PLACEHOLDER_PREFIX), 0),
            np.int64 if not shape else np.float32,
        )
        for name, shape in shapes.items()
        if name.startswith(PLACEHOLDER_PREFIX)
    }


class FeatureInfo:
    """timm's `FeatureInfo`: one dict per feature map of the network, in network order (`num_chs`,
    `reduction`, `module`, the module whose output it is, and `endpoint`, its slim name), and the
    `out_indices` of the maps chosen among them (all by default). As in timm, `channels()`,
    `reduction()` and `module_name()` give the chosen maps' values, or with `idx` those of map `idx`
    (or of a list of them) among all the maps; `info[i]` is the dict of map i."""

    def __init__(self, info: list[dict[str, Any]], out_indices: Sequence[int] | None = None) -> None:
        self.info = info
        self.out_indices = tuple(range(len(info)) if out_indices is None else out_indices)

    @staticmethod
    def map(endpoint: str, module: str, channels: int, reduction: int) -> dict[str, Any]:
        return {"num_chs": channels, "reduction": reduction, "module": module, "endpoint": endpoint}

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            idx = self.out_indices
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)

    def endpoints(self, idx: int | Sequence[int] | None = None):
        return self.get("endpoint", idx)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)
