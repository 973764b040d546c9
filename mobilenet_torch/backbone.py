"""Feature maps for detection and segmentation heads, as timm's `features_only` models and transformers'
`AutoBackbone` give them.

The backbone keeps only the modules its features need (shared with the model it was cut from): nothing
after the deepest feature, no pooling, no classifier. Every parameter it holds then gets a gradient from
a loss on its features, which DistributedDataParallel requires (unless told to search for unused ones).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .architecture import FeatureInfo
from .modeling import MobileNetV2Model, MobileNetV2PreTrainedModel, walk
from .outputs import BackboneOutput, as_output


class MobileNetV2Backbone(nn.Module):
    """Feature maps at chosen slim endpoints (`stage_names`: `layer_1`, `layer_2`, then each block's
    `layer_N/expansion_output` and `layer_N`, and `layer_19` where the model has the final 1x1 conv).

    >>> backbone = MobileNetV2Backbone.from_pretrained(folder, out_features=["layer_15/expansion_output", "layer_19"])
    >>> c4, c5 = backbone(pixel_values).feature_maps
    >>> backbone.channels, backbone.feature_info.reduction()  # [576, 1280], [16, 32] at depth 1.0

    Choose the maps by name (`out_features`) or by index into `stage_names` (`out_indices`, negative from
    the end), as transformers' backbones do; given neither, the last block output at each reduction
    (timm's default: 16, 24, 32, 96 and 320 channels at depth 1.0). The maps come in the order asked.
    `feature_info` is timm's `FeatureInfo` over every map, with `out_indices` the chosen ones.
    """

    def __init__(
        self,
        model: MobileNetV2PreTrainedModel,
        out_features: str | Sequence[str] | None = None,
        out_indices: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        source = model if isinstance(model, MobileNetV2Model) else model.mobilenet_v2
        self.config = source.config
        maps = source.feature_info
        self.stage_names = maps.endpoints()
        block_outputs = {step.endpoint for step in source.steps if step.block}
        indices = chosen_indices(self.stage_names, out_features, out_indices, default_indices(maps, block_outputs))
        self.feature_info = FeatureInfo(maps.info, indices)
        self.out_indices = list(indices)
        self.out_features = self.feature_info.endpoints()
        self.channels = self.feature_info.channels()
        deepest = self.stage_names[max(indices)]
        steps = []
        for step in source.steps:
            steps.append(step)
            module = source.get_submodule(step.module)
            if deepest == step.expansion_endpoint:
                place(self, step.module, BlockExpansion(module.expand_1x1))
                break
            place(self, step.module, module)
            if deepest == step.endpoint:
                break
        self.steps = tuple(steps)
        self.deepest = deepest

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        out_features: str | Sequence[str] | None = None,
        out_indices: int | Sequence[int] | None = None,
        **options: Any,
    ) -> MobileNetV2Backbone:
        """The backbone of any model folder or Hub id (a head there is dropped, with a logged warning);
        `options` as `MobileNetV2Model.from_pretrained` takes them."""
        return cls(MobileNetV2Model.from_pretrained(name_or_path, **options), out_features, out_indices)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None) -> BackboneOutput:
        _, found = walk(self, self.steps, pixel_values, set(self.out_features), self.deepest)
        output = BackboneOutput(feature_maps=tuple(found[name] for name in self.out_features))
        return as_output(output, return_dict, self.config)


class BlockExpansion(nn.Module):
    """The expansion alone of an inverted residual block, for a backbone whose deepest feature it is."""

    def __init__(self, expand_1x1: nn.Module) -> None:
        super().__init__()
        self.expand_1x1 = expand_1x1

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand_1x1(x)


def place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (dotted) inside `root`, creating empty parents, so that it keeps the name (and
    state dict keys) it has in `MobileNetV2Model`."""
    *parents, name = path.split(".")
    for part in parents:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root.get_submodule(part)
    root.add_module(name, module)


def default_indices(maps: FeatureInfo, block_outputs: set[str]) -> list[int]:
    """The last block output at each reduction."""
    blocks = [i for i, endpoint in enumerate(maps.endpoints()) if endpoint in block_outputs]
    reductions = maps.reduction(blocks)
    following = reductions[1:] + [None]
    return [i for i, reduction, after in zip(blocks, reductions, following, strict=True) if reduction != after]


def chosen_indices(
    stage_names: list[str],
    out_features: str | Sequence[str] | None,
    out_indices: int | Sequence[int] | None,
    default: list[int],
) -> list[int]:
    """The indices into `stage_names` of the maps asked for by name, by index, or both (then agreeing)."""
    by_name = by_index = None
    if out_features is not None:
        names = [out_features] if isinstance(out_features, str) else list(out_features)
        unknown = [name for name in names if name not in stage_names]
        if unknown or not names:
            wrong = unknown or names
            raise ValueError(f"out_features {wrong} are not feature maps of the model; choose from {stage_names}")
        by_name = [stage_names.index(name) for name in names]
    if out_indices is not None:
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        wrong = [i for i in indices if not -len(stage_names) <= i < len(stage_names)]
        if wrong or not indices:
            raise ValueError(f"out_indices {wrong or indices} are not indices of the {len(stage_names)} stage_names")
        by_index = [i % len(stage_names) for i in indices]
    if by_name is not None and by_index is not None and by_name != by_index:
        raise ValueError(f"out_features {out_features} and out_indices {out_indices} name different maps; pass one")
    return next((chosen for chosen in (by_name, by_index) if chosen is not None), default)
