"""What a Keras model config says beyond the weights: the input size and scaling, the head's layers and
their activations, and the class names the config holds."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from converter.slim import class_names
from converter.vocabulary import CLASSIFICATION
from mobilenet_torch.architecture import strided_conv_count
from mobilenet_torch.configuration import BOTTOM_RIGHT_PADDING, SAME_PADDING, MobileNetV2Config

CONV, DEPTHWISE, BATCHNORM, DENSE = "conv2d", "depthwise_conv2d", "batch_normalization", "dense"


CLASS_NAMES = {"Conv2D": CONV, "DepthwiseConv2D": DEPTHWISE, "BatchNormalization": BATCHNORM, "Dense": DENSE}


MODEL_NAME = re.compile(r"mobilenetv2_(?P<alpha>\d+\.\d+)_(?P<rows>\d+)")


KERAS_INPUT = {
    "image_processor_type": "MobileNetV2ImageProcessor",
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
}


RELU_OPTIONS = ("max_value", "negative_slope", "threshold")  # a ReLU layer with any of these is not a plain ReLU


# Layers that do nothing at inference (data augmentation, dropout) or that the backbone's ReLU6 already is.
INERT_LAYERS = re.compile(r"^(Random\w+|Dropout|SpatialDropout2D|GaussianNoise|GaussianDropout|InputLayer)$")


# Activations of a head's Dense layers: the hidden ones may apply these, the last one only "linear" (logits)
# or "softmax" (noted: the converted model returns logits).
HIDDEN_ACTIVATIONS = ("relu", "linear")


def class_labels(count: int, configured: list[str] | None) -> tuple[str, ...]:
    if configured is not None and len(configured) == count:
        return tuple(configured)
    imagenet = class_names(CLASSIFICATION, 1001)
    if count == len(imagenet) - 1:
        return tuple(imagenet[1:])  # Keras' ImageNet head has no background class
    return tuple(class_names(CLASSIFICATION, count))


class ConfigFacts:
    """Input size, preprocessing layers, pooling and labels, read off a Keras model config."""

    def __init__(self, config: dict | None, backbone_layers: int) -> None:
        self.notes: list[str] = []
        self.image_size: int | None = None
        self.preprocessing: dict[str, Any] | None = None  # None: [-1, 1], as the preprocessor config
        self.head_problem: str | None = None
        self.model_name: str | None = None
        self.class_names: list[str] | None = None
        self.head_layers: list[str] = []  # the weighted layers the config has after the backbone
        # (activation, use_bias) of each Dense layer after the backbone; None without a config to say.
        self.dense_layers: list[tuple[str, bool]] | None = None
        # How each stride-2 conv pads, where that is not TF's SAME (see _strided_padding); None: SAME.
        self.strided_padding: tuple[str, ...] | None = None
        if not isinstance(config, dict):
            return
        leaves, containers = [], []
        flatten_layers(config, leaves, containers)
        self.model_name = next((n for n in containers if MODEL_NAME.search(n or "")), None)
        names = config.get("class_names") or (config.get("config") or {}).get("class_names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            self.class_names = names
        weighted = [i for i, (cls, _, _) in enumerate(leaves) if cls in CLASS_NAMES]
        if len(weighted) < backbone_layers:
            return
        first, last = weighted[0], weighted[backbone_layers - 1]
        self.head_layers = [leaves[i][1] for i in weighted[backbone_layers:]]
        if self._inputs(leaves[:first]):
            self._strided_padding(leaves[first : last + 1])
        self._head(leaves[last + 1 :])

    def _inputs(self, before: list[tuple[str, str, dict]]) -> bool:
        """Reads the input size and the layers ahead of the backbone; whether the backbone was built for
        inputs of any size."""
        shapes = [c.get("batch_shape") or c.get("batch_input_shape") for _, _, c in before]
        shapes = [s for s in shapes if isinstance(s, list) and len(s) == 4]
        if shapes and None not in shapes[0][1:3]:
            rows, cols = shapes[0][1:3]
            if rows == cols:
                self.image_size = int(rows)
            else:
                self.notes.append(f"The Keras model's input is {rows}x{cols} (not square).")
        for cls, name, cfg in before:
            if cls == "Rescaling":
                self._rescaling(name, cfg)
            elif INERT_LAYERS.match(cls):
                self._left_out(cls, name)
            else:
                self.notes.append(f"The Keras model applies {cls} ({name}) ahead of the backbone; ours does not.")
        # A base built with input_shape=None fixes its paddings for any size, even when wrapped at a fixed one.
        return any(None in s[1:3] for s in shapes)

    def _strided_padding(self, backbone: list[tuple[str, str, dict]]) -> None:
        """How each stride-2 conv of a backbone built for any input size pads: Keras' `correct_pad` of an unknown
        size pads ((0, 1), (0, 1)) ahead of a VALID conv at every size; a conv padding "same" pads TF's SAME."""
        paddings, pad = [], None
        for cls, _, cfg in backbone:
            if cls == "ZeroPadding2D":
                pad = cfg.get("padding")
            elif CLASS_NAMES.get(cls) in (CONV, DEPTHWISE):
                if cfg.get("strides") in ([2, 2], 2):
                    bottom_right = cfg.get("padding") == "valid" and pad == [[0, 1], [0, 1]]
                    paddings.append(BOTTOM_RIGHT_PADDING if bottom_right else SAME_PADDING)
                pad = None
        if BOTTOM_RIGHT_PADDING not in paddings:
            return
        if len(paddings) != strided_conv_count(MobileNetV2Config()):
            self.notes.append(
                f"The Keras model config names {len(paddings)} stride-2 layers, not MobileNetV2's: their padding "
                "was not read, and the converted model pads TF's SAME."
            )
            return
        self.strided_padding = tuple(paddings)
        self.notes.append(
            "The Keras backbone was built for inputs of any size (input_shape=None): Keras then pads "
            f"{paddings.count(BOTTOM_RIGHT_PADDING)} of its stride-2 layers ((0, 1), (0, 1)) at every size, "
            "where TF's SAME pads (1, 1) on odd maps; the converted model pads as Keras does."
        )

    def _left_out(self, cls: str, name: str) -> None:
        """An inert layer (augmentation, dropout: the identity at inference) is noted where the model has it."""
        if cls != "InputLayer":
            self.notes.append(f"The Keras model's {cls} layer ({name}) is inactive at inference and was left out.")

    def _rescaling(self, name: str, cfg: dict) -> None:
        """Rescaling computes x * scale + offset: the same input the preprocessor must produce from pixels."""
        try:
            scale = np.broadcast_to(np.asarray(cfg.get("scale", 1.0), dtype=np.float64), (3,))
            offset = np.broadcast_to(np.asarray(cfg.get("offset", 0.0), dtype=np.float64), (3,))
        except (TypeError, ValueError):
            self.notes.append(f"The Keras model's Rescaling layer ({name}) has a scale the converter cannot read.")
            return
        if not np.all(scale > 0):
            self.notes.append(f"The Keras model's Rescaling layer ({name}) has a non-positive scale.")
            return
        # x * scale + offset == (x / 255 - mean) / std with std = 1 / (255 scale), mean = -offset * std.
        std = 1 / (255 * scale)
        mean = -offset * std
        if not np.allclose([mean, std], 0.5, rtol=1e-6):  # anything but x / 127.5 - 1
            self.preprocessing = dict(KERAS_INPUT, image_mean=mean.tolist(), image_std=std.tolist())
        self.notes.append(
            f"The Keras model rescales its inputs itself (Rescaling {name}: x * {cfg.get('scale')} + "
            f"{cfg.get('offset', 0.0)}); the converted model leaves that to its preprocessor config."
        )

    def _head(self, after: list[tuple[str, str, dict]]) -> None:
        """The pooling ahead of the Dense layers, and each Dense layer's (activation, use_bias), its
        activation taken from the layer or from a ReLU / Activation / Softmax layer right after it."""
        dense = [i for i, (cls, _, _) in enumerate(after) if cls == "Dense"]
        before_dense = after[: dense[0]] if dense else after
        classes = [cls for cls, _, _ in before_dense]
        if dense:
            if "GlobalMaxPooling2D" in classes:
                self.head_problem = "the classifier follows GlobalMaxPooling2D, but MobileNetV2 pools by average"
            elif "AveragePooling2D" in classes:
                self.notes.append(
                    "The Keras head pools with a fixed AveragePooling2D window (global only at its native size); "
                    "the converted model pools globally."
                )
            elif "GlobalAveragePooling2D" not in classes:
                self.head_problem = f"the classifier does not follow global average pooling ({', '.join(classes)})"
        layers: list[list] = []  # [activation, use_bias] per Dense
        for cls, name, cfg in after:
            if cls == "Dense":
                layers.append([activation_name(cfg.get("activation")), cfg.get("use_bias", True) is not False])
            elif cls in ("ReLU", "Activation", "Softmax") and not layers:
                continue  # the backbone's final ReLU6 (out_relu)
            elif cls in ("ReLU", "Activation", "Softmax"):
                applied = activation_name(cfg.get("activation")) if cls == "Activation" else cls.lower()
                if cls == "ReLU" and any(cfg.get(key) not in (None, 0, 0.0) for key in RELU_OPTIONS):
                    applied = f"ReLU({', '.join(f'{k}={cfg.get(k)}' for k in RELU_OPTIONS)})"
                if layers[-1][0] != "linear":
                    self.head_problem = f"{name} applies {applied} after {layers[-1][0]}, which MobileNetV2 does not"
                layers[-1][0] = applied
            elif INERT_LAYERS.match(cls):
                self._left_out(cls, name)
            elif cls not in ("GlobalAveragePooling2D", "AveragePooling2D", "Flatten", "GlobalMaxPooling2D"):
                self.notes.append(f"The Keras model applies {cls} ({name}) after the backbone; the converted does not.")
        for j, (activation, _) in enumerate(layers):
            if j == len(layers) - 1 and activation == "softmax":
                self.notes.append("The Keras model ends in a softmax; the converted model returns logits.")
            elif j == len(layers) - 1 and activation != "linear":
                self.head_problem = f"the classifier applies activation {activation!r} to its logits"
            elif j < len(layers) - 1 and activation not in HIDDEN_ACTIVATIONS:
                self.head_problem = (
                    f"the head's Dense layer {j + 1} applies activation {activation!r}; "
                    f"mobilenet_torch computes {' or '.join(HIDDEN_ACTIVATIONS)} there"
                )
        self.dense_layers = [(activation, use_bias) for activation, use_bias in layers]


def activation_name(value: Any) -> str:
    """A Keras activation as named in a layer config ("linear" for none)."""
    return "linear" if value in (None, "linear") else value if isinstance(value, str) else repr(value)


def flatten_layers(entry: Any, leaves: list, containers: list) -> None:
    """Leaf layers of a (possibly nested) model config in order, and the container names."""
    if not isinstance(entry, dict):
        return
    cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    layers = cfg.get("layers")
    if isinstance(layers, list):
        containers.append(cfg.get("name"))
        for layer in layers:
            flatten_layers(layer, leaves, containers)
    elif isinstance(entry.get("class_name"), str):
        leaves.append((entry["class_name"], cfg.get("name") or entry.get("name"), cfg))
