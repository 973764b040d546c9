"""MobileNetV2 for PyTorch with TensorFlow-exact semantics, laid out like transformers' port.

The architecture is a table (`architecture.BLOCKS`); its one walk (`architecture.backbone_steps`) is run by
`walk`, which forward, hidden states and `extract_features` (through `forward_intermediates`) and the
backbone for heads (`backbone.MobileNetV2Backbone`) all call; the integer and fake-quant models follow
the same steps. Forward signatures, outputs (`outputs.py`) and losses are transformers' (`labels`,
`output_hidden_states`, `return_dict`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import (
    HEAD_CHANNELS,
    HEAD_NORM_EPS,
    FeatureInfo,
    Step,
    backbone_steps,
    block_channels,
    block_expands,
    block_schedule,
    final_conv_channels,
    hidden_classifier_layers,
    placeholder_arrays,
    strided_paddings,
)
from .configuration import SAME_PADDING, MobileNetV2Config
from .errors import UnsupportedConfigError
from .layers import ConvLayer, InvertedResidual
from .loading import HUB_OPTIONS, WEIGHTS_NAME, load_folder, resolve_folder
from .outputs import BaseModelOutputWithPooling, ImageClassifierOutput, SemanticSegmenterOutput, as_output

# Slim endpoint names in network order (see `backbone_steps`), then the pool and the logits. The 16
# blocks' outputs are transformers' hidden states.
BLOCK_ENDPOINTS = tuple(step.endpoint for step in backbone_steps() if step.expansion_endpoint is not None)
ENDPOINTS = tuple(name for step in backbone_steps() for name in step.endpoints) + ("global_pool", "logits")


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
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        device_map: torch.device | str | int | dict[str, Any] | None = None,
        ignore_mismatched_sizes: bool = False,
        use_safetensors: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> MobileNetV2PreTrainedModel:
        """Load a folder written by `save_pretrained` (or the converter), or a Hub id (needs huggingface_hub),
        taking transformers' arguments. Reads safetensors only.

        - `dtype` (or `torch_dtype`, its older name): a floating torch dtype or its name; "auto" or None
          keep the file's.
        - `device_map`, as transformers takes it for a model on one device: "auto" (the first GPU, else the
          CPU), a device, its name or CUDA index, or {"": device}. `device` is the same.
        - `cache_dir`, `revision`, `token`, `local_files_only` apply to Hub ids; as in transformers, a local
          folder is read as it is.
        - Keyword arguments naming config fields (`num_labels=10`, `classifier_dropout_prob=0.1`,
          `output_hidden_states=True`) override config.json; a head whose shape changes that way needs
          `ignore_mismatched_sizes=True`. Others go to the constructor (`add_pooling_layer`).

        Any folder serves any class: `MobileNetV2Model` drops a head (with a logged warning); a head the
        folder lacks is newly initialised, with a warning.
        """
        if use_safetensors is False:
            raise ValueError("use_safetensors=False: only model.safetensors is read, pickled weights never are")
        hub = dict(cache_dir=cache_dir, revision=revision, token=token, local_files_only=local_files_only)
        folder = resolve_folder(name_or_path, **hub)
        options = dict(dtype=dtype, torch_dtype=torch_dtype, device=device, device_map=device_map)
        return load_folder(cls, folder, ignore_mismatched_sizes=ignore_mismatched_sizes, **options, **overrides)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (BatchNorm statistics are buffers, not counted), as transformers counts them.
        `exclude_embeddings` is accepted for transformers' signature; a CNN has no embeddings."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

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
        self.steps = backbone_steps(final_conv)
        layer = dict(norm_eps=config.layer_norm_eps, activation=config.hidden_act, tf_padding=config.tf_padding)
        (stem_channels, _, stem_out), *blocks = block_channels(config)
        stem_step, *block_steps = (step for step in self.steps if step.block)
        expand = block_expands(config, stem_step)
        paddings = iter(strided_paddings(config))  # one per stride-2 conv, taken in network order
        self.conv_stem = MobileNetV2Stem(
            config.num_channels, stem_channels, stem_out, expand=expand, strided_padding=next(paddings), **layer
        )
        self.layer = nn.ModuleList(
            InvertedResidual(
                in_channels,
                expanded,
                out_channels,
                stride,
                dilation,
                expand=block_expands(config, step),
                strided_padding=next(paddings) if stride > 1 else SAME_PADDING,
                **layer,
            )
            for step, (in_channels, expanded, out_channels), (stride, dilation) in zip(
                block_steps, blocks, block_schedule(config), strict=True
            )
        )
        self.out_channels = blocks[-1][2]
        self.conv_1x1 = None
        if final_conv:
            self.conv_1x1 = ConvLayer(self.out_channels, final_conv_channels(config), 1, **layer)
            self.out_channels = final_conv_channels(config)
        self.pool = add_pooling_layer

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """`pooler_output` is [N, C] as transformers' (a map with `avg_pool="fixed7x7"` on large inputs).
        `output_hidden_states` unset takes config.json's (transformers' generic field; false by default)."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # Hidden states are kept only when asked: they hold memory.
        x, hidden_states = self.forward_intermediates(pixel_values, BLOCK_ENDPOINTS if output_hidden_states else ())
        pooled = pool_features(x, self.config.avg_pool) if self.pool else None
        if pooled is not None and pooled.shape[-2:] == (1, 1):
            pooled = pooled.flatten(1)
        output = BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states.values()) if output_hidden_states else None,
        )
        return as_output(output, return_dict, self.config)

    def forward_intermediates(
        self, pixel_values: torch.Tensor, keep: Collection[str] = (), last: str | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The one walk of the network (see `walk`) over this model's steps."""
        return walk(self, self.steps, pixel_values, keep, last)

    def extract_features(self, pixel_values: torch.Tensor, names: str | Sequence[str]):
        """Named slim endpoints (NCHW), computing nothing past the deepest one requested: a dict by name
        for a list of names, the tensor itself for a single name.

        Backbone names: `layer_1`..`layer_19`, `layer_N/expansion_output` (N = 3..18) and
        `global_pool`. Classification models also offer `logits`.
        """
        if isinstance(names, str):
            return self.extract_features(pixel_values, [names])[names]
        wanted = set(names)
        unknown = wanted - set(self.endpoint_names())
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)}; choose from {self.endpoint_names()}")
        deepest = max(ENDPOINTS.index(name) for name in wanted)
        last = ENDPOINTS[deepest] if "global_pool" not in wanted else None
        x, found = self.forward_intermediates(pixel_values, wanted, last)
        if "global_pool" in wanted:
            found["global_pool"] = pool_features(x, self.config.avg_pool)
        return {name: found[name] for name in names}

    def endpoint_names(self) -> list[str]:
        names = [name for step in self.steps for name in step.endpoints]
        return names + ["global_pool"] if self.conv_1x1 is not None else names

    @property
    def feature_info(self) -> FeatureInfo:
        """timm's description of every feature map (all endpoints but `global_pool`), read from the
        layers: channels, reduction (a map is ceil(input size / reduction) on a side), the module whose
        output it is, and its slim endpoint name."""
        maps, reduction = [], 1
        for step in self.steps:
            module = self.get_submodule(step.module)
            if step.block:
                if step.expansion_endpoint is not None:
                    expanded = module.conv_3x3.convolution.in_channels
                    module_name = f"{step.module}.expand_1x1"
                    maps.append(FeatureInfo.map(step.expansion_endpoint, module_name, expanded, reduction))
                reduction *= module.conv_3x3.stride
                channels = module.reduce_1x1.convolution.out_channels
            else:
                reduction *= module.stride
                channels = module.convolution.out_channels
            maps.append(FeatureInfo.map(step.endpoint, step.module, channels, reduction))
        return FeatureInfo(maps)


def walk(
    root: nn.Module,
    steps: Sequence[Step],
    pixel_values: torch.Tensor,
    keep: Collection[str] = (),
    last: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The one walk of the network (`architecture.backbone_steps`), as timm's `forward_intermediates`: run
    the steps' modules (found in `root` by their paths) up to the endpoint `last` (all of them when None)
    and return the last tensor and those of the endpoints in `keep`, in network order."""
    x, kept = pixel_values, {}
    for step in steps:
        module = root.get_submodule(step.module)
        if step.block:
            expanded = module.expand(x)
            if step.expansion_endpoint in keep:
                kept[step.expansion_endpoint] = expanded
            if last is not None and last == step.expansion_endpoint:
                return expanded, kept
            x = module.project(expanded, x)
        else:
            x = module(x)
        if step.endpoint in keep:
            kept[step.endpoint] = x
        if last == step.endpoint:
            break
    return x, kept


class MobileNetV2Stem(InvertedResidual):
    """`Conv` (3x3, stride 2) followed by `expanded_conv`, the block that by default has no expansion
    layer (`first_layer_is_expansion`)."""

    def __init__(self, in_channels: int, stem_channels: int, out_channels: int, **block: Any) -> None:
        super().__init__(stem_channels, stem_channels, out_channels, **block)
        first_conv = {key: value for key, value in block.items() if key != "expand"}
        self.first_conv = ConvLayer(in_channels, stem_channels, 3, stride=2, **first_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(x)
        return self.project(self.expand(x), x)


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
        if config.num_labels == 0:
            raise UnsupportedConfigError(
                "num_labels=0 (transformers' classifier without a head) is not built; use MobileNetV2Model"
            )
        self.mobilenet_v2 = MobileNetV2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        # A Keras head's Dense layers ahead of the classifier (`config.classifier_layers`; none in transformers).
        features, hidden, activations = self.mobilenet_v2.out_channels, [], []
        for units, activation in hidden_classifier_layers(config):
            hidden.append(nn.Linear(features, units))
            activations.append(nn.ReLU() if activation == "relu" else nn.Identity())
            features = units
        self.classifier_hidden = nn.ModuleList(hidden)
        self.classifier_activations = nn.ModuleList(activations)
        self.classifier = nn.Linear(features, config.num_labels)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput:
        """`labels` [N] (class indices; floats [N, num_labels] for multi-label) give `loss`, as transformers'."""
        backbone = self.mobilenet_v2(pixel_values, output_hidden_states, return_dict=True)
        logits = self.classify(backbone.pooler_output)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=backbone.hidden_states)
        return as_output(output, return_dict, self.config)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The 1x1 logits conv of the original, applied to pooled features ([N, C], or a [N, C, h, w] map)."""
        pooled = self.dropout(pooled)
        if pooled.shape[-2:] == (1, 1):
            pooled = pooled.flatten(1)
        for dense, activation in zip(self.classifier_hidden, self.classifier_activations, strict=True):
            pooled = activation(_apply_linear(dense, pooled))
        return _apply_linear(self.classifier, pooled)

    def extract_features(self, pixel_values: torch.Tensor, names: str | Sequence[str]):
        """Like `MobileNetV2Model.extract_features`, plus `logits`."""
        if isinstance(names, str):
            return self.extract_features(pixel_values, [names])[names]
        backbone_names = [name if name != "logits" else "global_pool" for name in names]
        features = self.mobilenet_v2.extract_features(pixel_values, backbone_names)
        if "logits" in names:
            features["logits"] = self.classify(features["global_pool"])
        return {name: features[name] for name in names}


def _apply_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear` on [N, C] features, or as a 1x1 conv on a [N, C, h, w] map."""
    if x.ndim == 2:
        return linear(x)
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: MobileNetV2Config) -> torch.Tensor:
    """transformers' loss for image classification: `config.problem_type`, or, when it is None, regression
    for one label, cross-entropy for integer labels, binary cross-entropy per label for float ones."""
    if logits.ndim != 2:
        raise ValueError(f"a loss needs logits [N, num_labels], got {list(logits.shape)}: use global pooling")
    problem = config.problem_type
    if problem is None:
        integer = labels.dtype in (torch.long, torch.int)
        single = "single_label_classification" if integer else "multi_label_classification"
        problem = "regression" if config.num_labels == 1 else single
    labels = labels.to(logits.device)
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if config.num_labels == 1 else F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


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

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SemanticSegmenterOutput:
        """`labels` [N, H, W] give `loss` as transformers computes it: cross-entropy of the logits resized
        bilinearly (align_corners=False) to the labels' size, ignoring `config.semantic_loss_ignore_index`."""
        if labels is not None and self.config.num_labels == 1:
            raise ValueError("a segmentation loss needs more than one label")
        backbone = self.mobilenet_v2(pixel_values, output_hidden_states, return_dict=True)
        logits = self.segmentation_head(backbone.last_hidden_state)
        loss = None
        if labels is not None:
            resized = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(resized, labels, ignore_index=self.config.semantic_loss_ignore_index)
        output = SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=backbone.hidden_states)
        return as_output(output, return_dict, self.config)

    @torch.no_grad()
    def predict_labels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Label map [N, H, W] at the input size: logits resized bilinearly with align_corners=True
        (as the original graph does) and then arg-maxed."""
        logits = self(pixel_values).logits
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)
        return logits.argmax(dim=1)

    def extract_features(self, pixel_values: torch.Tensor, names: str | Sequence[str]):
        """Backbone endpoints (up to layer_18) plus the head's `image_pooling`, `aspp0`,
        `concat_projection` and `logits`."""
        if isinstance(names, str):
            return self.extract_features(pixel_values, [names])[names]
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


def final_conv_placeholders(config: MobileNetV2Config) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in placeholder_arrays(config).items()}


ARCHITECTURES = {
    cls.__name__: cls
    for cls in (MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation, MobileNetV2Model)
}


def load_pretrained(name_or_path: str | os.PathLike, **options: Any) -> MobileNetV2PreTrainedModel:
    """The model of the class the folder's config.json names (`architectures`; classification when it
    names none), as transformers' Auto classes pick it. `options` as `from_pretrained` takes them."""
    folder = resolve_folder(name_or_path, **{key: options.pop(key) for key in HUB_OPTIONS if key in options})
    names = MobileNetV2Config.from_pretrained(folder).architectures or []
    cls = next((ARCHITECTURES[name] for name in names if name in ARCHITECTURES), MobileNetV2ForImageClassification)
    return cls.from_pretrained(folder, **options)
