"""`MobileNetV2Config`: the fields and JSON layout of transformers' MobileNetV2 config, without transformers."""

from __future__ import annotations

import json
import os
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"  # next to it in a model folder
POOLING_MODES = ("global", "fixed7x7")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
DEFAULT_NUM_LABELS = 1001  # ImageNet with background, the original checkpoints' head
FILE_DEFAULT_NUM_LABELS = 2  # what transformers assumes for a config.json that names no labels
LABEL_KEYS = ("id2label", "label2id", "num_labels")
# transformers' generic config fields that the models honour, with transformers' defaults: hidden states
# when a call does not say, and dict-like outputs or plain tuples. config.json holds them among `extra`.
OUTPUT_OPTIONS = {"output_hidden_states": False, "return_dict": True}
# transformers' `hidden_act` names that this model computes, as the torch.nn module (and its arguments)
# that gives transformers' result; the rest of its ACT2FN is refused.
ACTIVATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "relu6": ("ReLU6", {"inplace": True}),
    "relu": ("ReLU", {"inplace": True}),
    "gelu": ("GELU", {}),
    "gelu_pytorch_tanh": ("GELU", {"approximate": "tanh"}),
    "silu": ("SiLU", {"inplace": True}),
    "swish": ("SiLU", {"inplace": True}),
    "hardswish": ("Hardswish", {"inplace": True}),
    "mish": ("Mish", {"inplace": True}),
    "leaky_relu": ("LeakyReLU", {"inplace": True}),
    "tanh": ("Tanh", {}),
    "sigmoid": ("Sigmoid", {}),
    "linear": ("Identity", {}),
}
# The activations a hidden classifier layer may apply (Keras' Dense heads: ReLU or none).
CLASSIFIER_ACTIVATIONS = ("relu", "linear")
CLASSIFIER_LAYER_KEYS = {"units", "activation"}
# How a stride-2 conv pads (`strided_padding`, with `tf_padding` true): "same" is TF's SAME, decided per
# input size (transformers' `tf_padding`); "bottom_right" pads kernel // 2 - 1 rows and columns before and
# kernel // 2 after at every size ((0, 1) for a 3x3), as Keras' MobileNetV2 built for any input size pads
# its strided depthwise convs.
SAME_PADDING, BOTTOM_RIGHT_PADDING = "same", "bottom_right"
STRIDED_PADDINGS = (SAME_PADDING, BOTTOM_RIGHT_PADDING)


@dataclass
class MobileNetV2Config:
    """Hyper-parameters of MobileNetV2, named as transformers names them so `config.json` loads there.

    Only `avg_pool` is ours: transformers always pools globally. Every other field computes what it
    computes in transformers; a value this model cannot compute is refused (`UnsupportedConfigError`).
    Labels are given as transformers takes them: `id2label`, `label2id` or `num_labels` (generic names
    `LABEL_i`); `num_labels` and `label2id` are always derived from `id2label`, as in transformers.
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
    id2label: dict[int, str] | None = None
    # None: inferred from the labels at each call, as transformers does (see `classification_loss`).
    problem_type: str | None = None
    architectures: list[str] | None = None
    # "global": average over the whole final feature map (transformers' behaviour);
    # "fixed7x7": slim's fixed 7x7 VALID window (kernel shrunk to smaller maps), giving a logits map.
    avg_pool: str = "global"
    # Ours too: the Dense layers between the pooling and `classifier`, as [{"units": 100, "activation":
    # "relu"}, ...] (a Keras head such as Teachable Machine's). None: transformers' single Linear. transformers
    # ignores the field, so a folder that has it loads there as MobileNetV2Model (the backbone) only.
    classifier_layers: list[dict[str, Any]] | None = None
    # Ours too: how each stride-2 conv pads, in network order (one of `STRIDED_PADDINGS` each), where a source
    # pads otherwise than TF's SAME. None: SAME for all. transformers ignores the field and pads SAME, which
    # equals "bottom_right" only where that conv's input is even.
    strided_padding: list[str] | None = None
    # Keys we do not model (transformers_version, dtype, ...) are kept so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Constructor arguments only: both are read back from `id2label` (properties below the class).
    num_labels: InitVar[int | None] = None
    label2id: InitVar[dict[str, int] | None] = None

    model_type = "mobilenet_v2"

    def __post_init__(self, num_labels: int | None, label2id: dict[str, int] | None) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        elif label2id is not None:
            self.id2label = {int(i): label for label, i in sorted(label2id.items(), key=lambda item: int(item[1]))}
        else:
            self.id2label = generic_labels(DEFAULT_NUM_LABELS if num_labels is None else num_labels)
        if label2id is not None and {label: int(i) for label, i in label2id.items()} != self.label2id:
            raise ValueError(f"label2id {label2id} is not the inverse of id2label {self.id2label}")
        if num_labels is not None and num_labels != self.num_labels:
            raise ValueError(f"num_labels={num_labels} contradicts id2label, which has {self.num_labels} labels")
        if self.problem_type not in (None, *PROBLEM_TYPES):
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES} or None, got {self.problem_type!r}")
        if self.avg_pool not in POOLING_MODES:
            raise ValueError(f"avg_pool must be one of {POOLING_MODES}, got {self.avg_pool!r}")
        _refuse_unsupported(self)

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if key != "extra"}
        data["id2label"] = {str(i): label for i, label in self.id2label.items()}
        data["label2id"] = self.label2id
        data["model_type"] = self.model_type
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MobileNetV2Config:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {key: value for key, value in data.items() if key in known}
        extra = {key: value for key, value in data.items() if key not in known | {"model_type", *LABEL_KEYS}}
        # The first of id2label, label2id, num_labels that the file has decides (transformers' precedence).
        labels = next((key for key in LABEL_KEYS if data.get(key) is not None), None)
        if labels is None:
            kwargs["num_labels"] = FILE_DEFAULT_NUM_LABELS
        elif labels != "id2label":
            kwargs[labels] = data[labels]
        return cls(**kwargs, extra=extra)

    def with_overrides(self, **overrides: Any) -> MobileNetV2Config:
        """A copy with some fields replaced; labels may be given as `num_labels`, `id2label` or `label2id`,
        and transformers' `output_hidden_states` and `return_dict` too."""
        unknown = set(overrides) - {f.name for f in fields(self)} - set(LABEL_KEYS) - set(OUTPUT_OPTIONS) - {"extra"}
        if unknown:
            raise TypeError(f"MobileNetV2Config has no field {', '.join(sorted(unknown))}")
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        options = {key: overrides.pop(key) for key in OUTPUT_OPTIONS if key in overrides}
        data["extra"] = {**overrides.pop("extra", data["extra"]), **options}
        if any(key in overrides for key in LABEL_KEYS):
            del data["id2label"]
        return type(self)(**{**data, **overrides})

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_options: Any) -> MobileNetV2Config:
        """The config of a model folder or Hub id (`hub_options` as `resolve_folder` takes them)."""
        from .errors import ModelFolderError, UnsupportedConfigError
        from .loading import resolve_folder

        path = resolve_folder(name_or_path, **hub_options) / CONFIG_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except UnsupportedConfigError as error:
            raise UnsupportedConfigError(f"{path}: {error}") from None
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ModelFolderError(
                f"cannot read {path} ({reason}): pass a folder written by convert-mobilenet"
            ) from None


def _refuse_unsupported(config: MobileNetV2Config) -> None:
    from .architecture import STEM_CHANNELS, STEM_OUT_CHANNELS
    from .errors import UnsupportedConfigError

    if config.hidden_act not in ACTIVATIONS:
        raise UnsupportedConfigError(
            f"hidden_act={config.hidden_act!r} is not computed by mobilenet_torch; use one of {', '.join(ACTIVATIONS)}"
        )
    if not config.depth_multiplier > 0:
        raise UnsupportedConfigError(f"depth_multiplier={config.depth_multiplier} must be greater than zero")
    for name in ("depth_divisible_by", "min_depth", "num_channels"):
        if not getattr(config, name) >= 1:
            raise UnsupportedConfigError(f"{name}={getattr(config, name)} must be a positive integer")
    _refuse_classifier_layers(config.classifier_layers)
    _refuse_strided_padding(config)
    stem, stem_out = scaled_channels(config, STEM_CHANNELS), scaled_channels(config, STEM_OUT_CHANNELS)
    if stem == stem_out:
        # slim and Keras add a residual around such a stem block, transformers does not.
        raise UnsupportedConfigError(
            f"depth_multiplier={config.depth_multiplier}, min_depth={config.min_depth} give the stem block "
            f"equal input and output widths ({stem}), which slim and transformers compute differently; "
            "choose a larger depth_multiplier or a smaller min_depth"
        )


def _refuse_classifier_layers(layers: Any) -> None:
    from .errors import UnsupportedConfigError

    if layers is None:
        return
    if not isinstance(layers, list) or not all(
        isinstance(layer, dict)
        and set(layer) == CLASSIFIER_LAYER_KEYS
        and isinstance(layer["units"], int)
        and not isinstance(layer["units"], bool)
        and layer["units"] > 0
        and layer["activation"] in CLASSIFIER_ACTIVATIONS
        for layer in layers
    ):
        raise UnsupportedConfigError(
            f"classifier_layers={layers!r} is not computed by mobilenet_torch: give a list of "
            f'{{"units": <positive int>, "activation": one of {", ".join(CLASSIFIER_ACTIVATIONS)}}}, or null'
        )


def _refuse_strided_padding(config: MobileNetV2Config) -> None:
    from .architecture import strided_conv_count
    from .errors import UnsupportedConfigError

    paddings = config.strided_padding
    if paddings is None:
        return
    count = strided_conv_count(config)
    if not isinstance(paddings, list) or len(paddings) != count or any(p not in STRIDED_PADDINGS for p in paddings):
        raise UnsupportedConfigError(
            f"strided_padding={paddings!r} is not computed by mobilenet_torch: give a list of {count} values, one "
            f"per stride-2 conv, each one of {', '.join(STRIDED_PADDINGS)}, or null"
        )
    if not config.tf_padding and any(p != SAME_PADDING for p in paddings):
        raise UnsupportedConfigError(
            f"strided_padding={paddings!r} with tf_padding=False: symmetric padding and a padding of the "
            "stride-2 convs contradict each other; set tf_padding=True"
        )


def _num_labels(config: MobileNetV2Config) -> int:
    return len(config.id2label)


def _set_num_labels(config: MobileNetV2Config, num_labels: int) -> None:
    # transformers' setter: a new count means new generic labels; the same count keeps the names.
    if num_labels != len(config.id2label):
        config.id2label = generic_labels(num_labels)


def _label2id(config: MobileNetV2Config) -> dict[str, int]:
    return {label: i for i, label in config.id2label.items()}


# Assigned after the dataclass is built, whose __init__ has already taken the InitVars' defaults.
MobileNetV2Config.num_labels = property(_num_labels, _set_num_labels, doc="len(id2label)")
MobileNetV2Config.label2id = property(_label2id, doc="The inverse of id2label.")


def _output_option(name: str) -> property:
    def get(config: MobileNetV2Config) -> bool:
        return config.extra.get(name, OUTPUT_OPTIONS[name])

    def set_(config: MobileNetV2Config, value: bool) -> None:
        config.extra[name] = value

    return property(get, set_, doc=f"transformers' generic `{name}` (default {OUTPUT_OPTIONS[name]}).")


MobileNetV2Config.output_hidden_states = _output_option("output_hidden_states")
MobileNetV2Config.return_dict = _output_option("return_dict")


def generic_labels(count: int) -> dict[int, str]:
    return {i: f"LABEL_{i}" for i in range(count)}


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
