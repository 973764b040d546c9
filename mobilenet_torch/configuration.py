"""`MobileNetV2Config`: the fields and JSON layout of transformers' MobileNetV2 config, without transformers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
POOLING_MODES = ("global", "fixed7x7")


@dataclass
class MobileNetV2Config:
    """Hyper-parameters of MobileNetV2, named as transformers names them so `config.json` loads there.

    Only `avg_pool` is ours: transformers always pools globally (see the README for what it ignores).
    """

    num_channels: int = 3
    image_size: int = 224
    depth_multiplier: float = 1.0
    depth_divisible_by: int = 8
    min_depth: int = 8
    expand_ratio: float = 6.0
    output_stride: int = 32
    first_layer_is_expansion: bool = True
    finegrained_output: bool = True
    hidden_act: str = "relu6"
    tf_padding: bool = True
    classifier_dropout_prob: float = 0.8
    initializer_range: float = 0.02
    layer_norm_eps: float = 0.001
    semantic_loss_ignore_index: int = 255
    id2label: dict[int, str] = field(default_factory=lambda: {i: f"LABEL_{i}" for i in range(1001)})
    architectures: list[str] | None = None
    # "global": average over the whole final feature map (transformers' behaviour);
    # "fixed7x7": slim's fixed 7x7 VALID window (kernel shrunk to smaller maps), giving a logits map.
    avg_pool: str = "global"
    # Keys we do not model (transformers_version, dtype, ...) are kept so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "mobilenet_v2"

    def __post_init__(self) -> None:
        self.id2label = {int(k): v for k, v in self.id2label.items()}
        if self.avg_pool not in POOLING_MODES:
            raise ValueError(f"avg_pool must be one of {POOLING_MODES}, got {self.avg_pool!r}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if key != "extra"}
        data["id2label"] = {str(i): label for i, label in self.id2label.items()}
        data["label2id"] = self.label2id
        data["model_type"] = self.model_type
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MobileNetV2Config:
        known = {f.name for f in fields(cls)} - {"extra"}
        ignored = {"label2id", "model_type", "num_labels"}
        kwargs = {key: value for key, value in data.items() if key in known}
        extra = {key: value for key, value in data.items() if key not in known | ignored}
        return cls(**kwargs, extra=extra)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> MobileNetV2Config:
        return cls.from_dict(json.loads((Path(folder) / CONFIG_NAME).read_text()))


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping more than 10% (slim's rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def scaled_channels(config: MobileNetV2Config, channels: int) -> int:
    """Channels after the depth multiplier, exactly as transformers computes them (shapes must agree)."""
    return make_divisible(int(round(channels * config.depth_multiplier)), config.depth_divisible_by, config.min_depth)


def expanded_channels(config: MobileNetV2Config, in_channels: int, expansion: float) -> int:
    """Width of a block's expansion layer, as transformers computes it."""
    return make_divisible(int(round(in_channels * expansion)), config.depth_divisible_by, config.min_depth)
