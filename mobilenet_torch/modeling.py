"""MobileNetV2 for PyTorch with TensorFlow-exact semantics, laid out like transformers' port.

The architecture is a table (`BLOCKS`), walked once by `MobileNetV2Model.features`; classification,
segmentation, `extract_features` and the backbone wrapper are all consumers of that one walk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MobileNetV2Config, expanded_channels, scaled_channels
from .layers import ConvLayer, InvertedResidual

WEIGHTS_NAME = "model.safetensors"
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
HEAD_CHANNELS = 256
HEAD_NORM_EPS = 1e-5

# slim's V2_DEF after the stem: (expansion, output channels, stride) for expanded_conv_1..16.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)  # fmt: skip
STEM_OUT_CHANNELS = 16

# Slim endpoint names in network order: layer_1 is the stem conv, layer_2 the stem block,
# layer_3..layer_18 the 16 blocks, layer_19 the final 1x1 conv.
BLOCK_ENDPOINTS = tuple(f"layer_{i}" for i in range(3, 3 + len(BLOCKS)))
ENDPOINTS = (
    ("layer_1", "layer_2")
    + tuple(name for block in BLOCK_ENDPOINTS for name in (f"{block}/expansion_output", block))
    + ("layer_19", "global_pool", "logits")
)


def final_conv_channels(config: MobileNetV2Config) -> int:
    """1280 for depth <= 1 ("finegrained" output), scaled above it (1792 at depth 1.4)."""
    if config.finegrained_output and config.depth_multiplier < 1.0:
        return LAST_CHANNELS
    return scaled_channels(config, LAST_CHANNELS)


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


# Outputs are named tuples: read by name as transformers' (`.logits`) or by index, and, being tuples,
# they pass through torch.jit.trace, torch.export and the ONNX exporter unchanged.
class BaseModelOutputWithPooling(NamedTuple):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None


class ImageClassifierOutput(NamedTuple):
    logits: torch.Tensor


class SemanticSegmenterOutput(NamedTuple):
    logits: torch.Tensor


class MobileNetV2PreTrainedModel(nn.Module):
    """Config handling and safetensors (de)serialisation shared by every model class."""

    config: MobileNetV2Config

    def __init__(self, config: MobileNetV2Config) -> None:
        super().__init__()
        self.config = config

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (a folder transformers also loads)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config
        config.architectures = [type(self).__name__]
        config.save_pretrained(folder)
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        tensors.update(self.transformers_placeholders())
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})

    def transformers_placeholders(self) -> dict[str, torch.Tensor]:
        """Tensors transformers expects that this model does not have (none, unless overridden)."""
        return {}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> MobileNetV2PreTrainedModel:
        """Load a folder written by `save_pretrained` (or the converter). Reads safetensors only."""
        from .loading import load_folder

        return load_folder(cls, Path(folder))

    def fuse(self) -> MobileNetV2PreTrainedModel:
        """Fold every BatchNorm into its convolution for inference. Returns self (in eval mode).

        Models are built and loaded channels_last, the layout PyTorch's CPU kernels are fastest in, and
        take inputs in either layout; `.to(memory_format=torch.contiguous_format)` switches to NCHW.
        Outputs stay within 1e-5 of the unfused model. A fused model no longer has BatchNorm tensors,
        so save the unfused one.
        """
        self.eval()
        for module in self.modules():
            if isinstance(module, ConvLayer):
                module.fuse()
        return self


class MobileNetV2Model(MobileNetV2PreTrainedModel):
    """The backbone: stem, 16 inverted residual blocks and (unless excluded) the final 1x1 conv."""

    def __init__(self, config: MobileNetV2Config, add_pooling_layer: bool = True, final_conv: bool = True):
        super().__init__(config)
        eps = config.layer_norm_eps
        stem_channels = scaled_channels(config, STEM_CHANNELS)
        channels = [scaled_channels(config, STEM_OUT_CHANNELS)]
        self.conv_stem = MobileNetV2Stem(config.num_channels, stem_channels, channels[0], eps)
        self.layer = nn.ModuleList()
        for (expansion, out_channels, _), (stride, dilation) in zip(BLOCKS, block_schedule(config), strict=True):
            in_channels, out_channels = channels[-1], scaled_channels(config, out_channels)
            expanded = expanded_channels(config, in_channels, expansion)
            self.layer.append(InvertedResidual(in_channels, expanded, out_channels, stride, dilation, eps))
            channels.append(out_channels)
        self.out_channels = channels[-1]
        self.conv_1x1 = None
        if final_conv:
            self.out_channels = final_conv_channels(config)
            self.conv_1x1 = ConvLayer(channels[-1], self.out_channels, 1, norm_eps=eps)
        self.pool = add_pooling_layer

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        x = self.conv_stem(pixel_values)
        for block in self.layer:
            x = block(x)
        if self.conv_1x1 is not None:
            x = self.conv_1x1(x)
        pooled = pool_features(x, self.config.avg_pool) if self.pool else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def extract_features(self, pixel_values: torch.Tensor, names: list[str] | tuple[str, ...]):
        """Named slim endpoints (NCHW), computing nothing past the deepest one requested.

        Backbone names: `layer_1`..`layer_19`, `layer_N/expansion_output` (N = 3..18) and
        `global_pool`. Classification models also offer `logits`.
        """
        wanted = set(names)
        unknown = wanted - set(self.endpoint_names())
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)}; choose from {self.endpoint_names()}")
        deepest = max(ENDPOINTS.index(name) for name in wanted)
        found: dict[str, torch.Tensor] = {}
        for name, tensor in self._walk(pixel_values, ENDPOINTS[deepest]):
            if name in wanted:
                found[name] = tensor
        return {name: found[name] for name in names}

    def endpoint_names(self) -> list[str]:
        last = "layer_19" if self.conv_1x1 is not None else BLOCK_ENDPOINTS[-1]
        names = list(ENDPOINTS[: ENDPOINTS.index(last) + 1])
        return names + ["global_pool"] if self.conv_1x1 is not None else names

    def _walk(self, x: torch.Tensor, last: str):
        """Yield (endpoint, tensor) in network order, stopping after `last`."""
        x = self.conv_stem.first_conv(x)
        yield "layer_1", x
        if last == "layer_1":
            return
        x = self.conv_stem.block(x)
        yield "layer_2", x
        for name, block in zip(BLOCK_ENDPOINTS, self.layer, strict=True):
            if last == "layer_2":
                return
            expanded = block.expand(x)
            yield f"{name}/expansion_output", expanded
            if last == f"{name}/expansion_output":
                return
            x = block.project(expanded, x)
            yield name, x
            if last == name:
                return
        if self.conv_1x1 is None:
            return
        x = self.conv_1x1(x)
        yield "layer_19", x
        if last != "layer_19":
            yield "global_pool", pool_features(x, self.config.avg_pool)


class MobileNetV2Stem(InvertedResidual):
    """`Conv` (3x3, stride 2) followed by `expanded_conv`, the block without an expansion layer."""

    def __init__(self, in_channels: int, stem_channels: int, out_channels: int, norm_eps: float) -> None:
        super().__init__(stem_channels, stem_channels, out_channels, norm_eps=norm_eps)
        self.first_conv = ConvLayer(in_channels, stem_channels, 3, stride=2, norm_eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.first_conv(x))

    def block(self, x: torch.Tensor) -> torch.Tensor:
        """`expanded_conv` alone (slim's layer_2), without the stem conv."""
        return super().forward(x)


def pool_features(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Average pool: over the whole map ("global"), or slim's fixed 7x7 VALID window ("fixed7x7")."""
    if mode == "global":
        return F.adaptive_avg_pool2d(x, 1)
    kernel = (min(7, x.shape[-2]), min(7, x.shape[-1]))
    return F.avg_pool2d(x, kernel, stride=1)


class MobileNetV2ForImageClassification(MobileNetV2PreTrainedModel):
    """Backbone + average pool + linear classifier. `logits` is [N, num_labels] (with global pooling,
    or fixed pooling on a 7x7 map) or [N, num_labels, h, w] (fixed pooling on a larger map)."""

    def __init__(self, config: MobileNetV2Config) -> None:
        super().__init__(config)
        self.mobilenet_v2 = MobileNetV2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(self.mobilenet_v2.out_channels, config.num_labels)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True):
        pooled = self.mobilenet_v2(pixel_values).pooler_output
        logits = self.classify(pooled)
        return ImageClassifierOutput(logits=logits) if return_dict else (logits,)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The 1x1 logits conv of the original, applied to a pooled map; squeezed when it is 1x1."""
        pooled = self.dropout(pooled)
        if pooled.shape[-2:] == (1, 1):
            return self.classifier(pooled.flatten(1))
        weight = self.classifier.weight[:, :, None, None]
        return F.conv2d(pooled, weight, self.classifier.bias)

    def extract_features(self, pixel_values: torch.Tensor, names: list[str] | tuple[str, ...]):
        """Like `MobileNetV2Model.extract_features`, plus `logits`."""
        backbone_names = [name if name != "logits" else "global_pool" for name in names]
        features = self.mobilenet_v2.extract_features(pixel_values, backbone_names)
        if "logits" in names:
            features["logits"] = self.classify(features["global_pool"])
        return {name: features[name] for name in names}


class DeepLabV3Head(nn.Module):
    """DeepLab v3's head on MobileNetV2: image pooling + 1x1 ASPP, projection, 1x1 classifier."""

    def __init__(self, config: MobileNetV2Config, in_channels: int) -> None:
        super().__init__()
        head = dict(norm_eps=HEAD_NORM_EPS, activation="relu")
        self.conv_pool = ConvLayer(in_channels, HEAD_CHANNELS, 1, **head)
        self.conv_aspp = ConvLayer(in_channels, HEAD_CHANNELS, 1, **head)
        self.conv_projection = ConvLayer(2 * HEAD_CHANNELS, HEAD_CHANNELS, 1, **head)
        self.dropout = nn.Dropout2d(config.classifier_dropout_prob)
        self.classifier = ConvLayer(HEAD_CHANNELS, config.num_labels, 1, bias=True, norm_eps=None, activation=None)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.endpoints(features)["logits"]

    def endpoints(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head tensor by its DeepLab name, each computed once."""
        pooled = self.conv_pool(F.adaptive_avg_pool2d(features, 1))
        aspp = self.conv_aspp(features)
        # Bilinear resize of a 1x1 map is a broadcast; expand() avoids the interpolation kernel.
        spread = pooled.expand(-1, -1, features.shape[-2], features.shape[-1])
        projection = self.conv_projection(torch.cat([spread, aspp], dim=1))
        logits = self.classifier(self.dropout(projection))
        return {"image_pooling": pooled, "aspp0": aspp, "concat_projection": projection, "logits": logits}


class MobileNetV2ForSemanticSegmentation(MobileNetV2PreTrainedModel):
    """DeepLab v3 with a MobileNetV2 backbone. `logits` is [N, num_labels, ceil(H/os), ceil(W/os)].

    The backbone stops at layer_18: the original has no final 1x1 conv, so neither does this model.
    """

    def __init__(self, config: MobileNetV2Config) -> None:
        super().__init__(config)
        self.mobilenet_v2 = MobileNetV2Model(config, add_pooling_layer=False, final_conv=False)
        self.segmentation_head = DeepLabV3Head(config, self.mobilenet_v2.out_channels)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True):
        logits = self.segmentation_head(self.mobilenet_v2(pixel_values).last_hidden_state)
        return SemanticSegmenterOutput(logits=logits) if return_dict else (logits,)

    @torch.no_grad()
    def predict_labels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Label map [N, H, W] at the input size: logits resized bilinearly with align_corners=True
        (as the original graph does) and then arg-maxed."""
        logits = self(pixel_values).logits
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)
        return logits.argmax(dim=1)

    def extract_features(self, pixel_values: torch.Tensor, names: list[str] | tuple[str, ...]):
        """Backbone endpoints (up to layer_18) plus the head's `image_pooling`, `aspp0`,
        `concat_projection` and `logits`."""
        head_names = [name for name in names if name in SEGMENTATION_HEAD_ENDPOINTS]
        backbone_names = [name for name in names if name not in SEGMENTATION_HEAD_ENDPOINTS]
        if head_names:
            backbone_names.append(BLOCK_ENDPOINTS[-1])
        features = self.mobilenet_v2.extract_features(pixel_values, backbone_names)
        if head_names:
            features.update(self.segmentation_head.endpoints(features[BLOCK_ENDPOINTS[-1]]))
        return {name: features[name] for name in names}

    def transformers_placeholders(self) -> dict[str, torch.Tensor]:
        """transformers' segmentation model builds (and runs, uselessly) the final 1x1 conv; it gets
        inert weights (zero conv, identity BatchNorm statistics) so the folder loads cleanly there."""
        return final_conv_placeholders(self.config)


SEGMENTATION_HEAD_ENDPOINTS = ("image_pooling", "aspp0", "concat_projection", "logits")
PLACEHOLDER_PREFIX = "mobilenet_v2.conv_1x1."


def final_conv_placeholders(config: MobileNetV2Config) -> dict[str, torch.Tensor]:
    in_channels = scaled_channels(config, BLOCKS[-1][1])
    out_channels = final_conv_channels(config)
    return {
        PLACEHOLDER_PREFIX + "convolution.weight": torch.zeros(out_channels, in_channels, 1, 1),
        PLACEHOLDER_PREFIX + "normalization.weight": torch.ones(out_channels),
        PLACEHOLDER_PREFIX + "normalization.bias": torch.zeros(out_channels),
        PLACEHOLDER_PREFIX + "normalization.running_mean": torch.zeros(out_channels),
        PLACEHOLDER_PREFIX + "normalization.running_var": torch.ones(out_channels),
        PLACEHOLDER_PREFIX + "normalization.num_batches_tracked": torch.zeros((), dtype=torch.long),
    }


class MobileNetV2Backbone(nn.Module):
    """Feature maps at chosen slim endpoints, for detection or segmentation heads.

    >>> backbone = MobileNetV2Backbone(model, out_features=["layer_15/expansion_output", "layer_19"])
    >>> c4, c5 = backbone(pixel_values)
    """

    def __init__(self, model: MobileNetV2PreTrainedModel, out_features: list[str]) -> None:
        super().__init__()
        self.model = model
        self.out_features = list(out_features)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        features = self.model.extract_features(pixel_values, self.out_features)
        return [features[name] for name in self.out_features]
