"""TensorFlow Lite models (``.tflite``): float32, float16 or dynamic-range weights with float activations,
and uint8 per-tensor (TOCO era) or int8 per-channel full-integer models.

The flatbuffer is parsed natively (:mod:`converter.formats.tflite_schema`); no interpreter is needed.
Tensor names differ between converters, so ops are matched to slim scopes by the graph's topology
(:mod:`converter.formats.tflite_walk`); each conv's stride, dilation and channels are then checked
against the architecture that the variant implies, and residual ADDs against the blocks that have one.

TFLite folds each BatchNorm into its conv. The reader writes the folded (dequantized) weights with an
identity BatchNorm: gamma 1, beta = folded bias, moving mean 0, moving variance 1 - eps, so that the
mapping table and the model take them unchanged and ``(x - 0) / sqrt(1 - eps + eps) * 1 + beta`` adds
the bias back. A per-channel MUL or ADD the converter left after the conv is folded in there: gamma the
MUL's constant, beta the bias times gamma plus the ADD's constant.

The TFLite converter's float16 models store the weights as float16 constants that DEQUANTIZE ops widen
to float32 (exactly) ahead of float kernels; its dynamic-range models store most weights as int8
(per-channel symmetric for convs, those under 1024 values stay float32) and run hybrid kernels on
float activations. Both are read as the float32 model, each weight dequantized as TFLite does.

Full-integer models also yield two extra files for the output folder (described in
:mod:`mobilenet_torch.quantized`): the quantization parameters of every step of the integer graph,
and the integer weights and biases, which that module loads as a model reproducing TFLite's integer
arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import MappingError, TFLiteFormatError, UsageError
from converter.formats.base import Hints, Reader, References
from converter.formats.labels_file import teachable_machine_labels
from converter.formats.tflite_labels import packed_labels
from converter.formats.tflite_schema import Model, Tensor, parse_model
from converter.formats.tflite_walk import Step, Walk, has_bias
from converter.slim import HEADS, detect_variant
from converter.vocabulary import DEEPLAB
from mobilenet_torch.architecture import block_channels, block_schedule
from mobilenet_torch.configuration import BOTTOM_RIGHT_PADDING
from mobilenet_torch.quantized_files import INTEGER_WEIGHTS_FILE, QUANTIZATION_FILE, QUANTIZATION_FORMAT

BACKBONE_EPS = 1e-3
HEAD_EPS = 1e-5
HEAD_SCOPES = ("image_pooling", "aspp0", "concat_projection")
FLOAT_MODEL_WEIGHTS = ("float32", "float16", "int8")  # weight storage on float activations
# How TFLite turns stored weights into float32 for float (or hybrid) kernels.
WIDENED = {"float16": "float16 widened exactly", "int8": "int8 as scale * (q - zero_point)"}


class TFLiteReader(Reader):
    """A MobileNetV2 classifier or DeepLab v3 model from a ``.tflite`` flatbuffer."""

    def __init__(self, path: Path, archive: Path | None = None, *, backbone_only: bool = False) -> None:
        super().__init__(path, archive, backbone_only=backbone_only)
        self._bytes = path.read_bytes()
        self.model: Model = parse_model(self._bytes)
        walk = Walk(self.model)
        self.steps, self.kind = walk.run()
        self._stored = walk.stored
        self.output_form = walk.output_form
        self.hidden_activations = tuple(walk.hidden_activations)
        self.output_stride = _output_stride(self.steps) if self.kind == DEEPLAB else 32
        # A full-integer model (integer activations); float16 and dynamic-range models have float ones.
        self.quantized = self._activation_dtype() != "float32"
        self._check_types()
        self._tensors = self._slim_tensors()
        self._check_architecture()

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def source_files(self) -> list[Path]:
        return [self.path]

    @property
    def references(self) -> References:
        return References(tflite_file=self.path)

    @property
    def hybrid(self) -> bool:
        """A dynamic-range model whose convs take int8 weights on float activations: TFLite's hybrid
        kernels, which quantize each input to int8 on the fly (so no float model reproduces them to float
        precision). int8 weights behind a DEQUANTIZE op run float kernels instead."""
        direct = {self.model.tensors[step.op.inputs[1]].dtype for step in self._conv_steps()}
        return not self.quantized and "int8" in direct

    @property
    def hints(self) -> Hints:
        image = self.model.tensors[self.model.inputs[0]]
        if len(image.shape) != 4 or image.shape[1] != image.shape[2] or image.shape[3] != 3:
            raise TFLiteFormatError(f"the model input is {image.shape}; expected a square RGB image [1, h, h, 3]")
        num_labels = int(self._tensors[_head_weight(self.kind)].shape[-1])
        notes = [f"converted from a TFLite flatbuffer ({self._scheme()})"]
        weight_types = self._weight_types()
        if not self.quantized and weight_types != {"float32"}:
            source = "a dynamic-range quantized" if "int8" in weight_types else "a float16"
            how = ", ".join(text for dtype, text in WIDENED.items() if dtype in weight_types)
            note = (
                f"the source is {source} model; the converted model is float32, its weights dequantized as TFLite "
                f"dequantizes them ({how}); BatchNorm was folded by the TFLite converter and is written as a "
                "BatchNorm with mean 0 and variance 1 - eps"
            )
            if self.hybrid:
                note += (
                    "; its hybrid kernels also quantize each conv's input to int8 on the fly, the float model does not"
                )
            notes.append(note)
        if self.quantized:
            notes.append(
                "weights dequantized (real = scale * (q - zero_point)); BatchNorm was folded by the TFLite "
                "converter and is written as a BatchNorm with mean 0 and variance 1 - eps (gamma 1 where "
                f"folded into the conv); integer model in {QUANTIZATION_FILE}"
            )
        notes.append(f"the source's output: {self.output_form}")
        preprocessing = None
        input_quantization = self._input_quantization()
        if input_quantization is not None:
            preprocessing = {"input_quantization": input_quantization}
        labels, label_notes = packed_labels(self._bytes, self.model.metadata, num_labels)
        if labels is None and self.kind != DEEPLAB:  # Teachable Machine's model_unquant.tflite and labels.txt
            labels, beside_notes, preprocessing = teachable_machine_labels(
                self.path, num_labels, image.shape[1], preprocessing
            )
            label_notes += beside_notes
        return Hints(
            image_size=image.shape[1],
            output_stride=self.output_stride if self.kind == DEEPLAB else None,
            labels=labels,
            convention="raw",
            preprocessing=preprocessing,
            hidden_activations=self.hidden_activations,
            strided_padding=self._strided_padding(),
            notes=(*notes, *label_notes),
        )

    def extra_files(self, background: str | None = None) -> tuple[dict[str, bytes], list[str]]:
        """(`quantization.json` and `quantized.safetensors`, notes) for a quantized model, nothing for a float
        one (nor for a backbone alone: the integer model is the whole graph). With `background` "drop" the
        integer classifier loses its first output, as the float one does."""
        if not self.quantized or self.backbone_only:
            return {}, []
        from safetensors.numpy import save

        if background == "add":
            raise UsageError(
                "--add-background cannot be given to a full-integer model: its integer classifier has no exact "
                "class that never wins; convert without it"
            )
        integers = {}
        for step in self._conv_steps():
            weight = self.model.data(self.model.tensors[step.op.inputs[1]])
            integers[f"{step.name}.weight"] = _torch_layout(step.op.op, weight)
            bias = self.model.data(self.model.tensors[step.op.inputs[2]]) if has_bias(step.op) else None
            integers[f"{step.name}.bias"] = (
                np.zeros(weight.shape[0], np.int32) if bias is None else bias.astype(np.int32)
            )
        for step in self.steps:
            if step.constant is not None:
                integers[f"{step.name}.constant"] = self.model.data(self.model.tensors[step.constant])
        steps = {step.name: self._describe(step) for step in self.steps}
        notes = []
        if background == "drop":
            notes = _drop_background(steps, integers)
        document = {
            "format": QUANTIZATION_FORMAT,
            "source": self.path.name,
            "scheme": self._scheme(),
            "kind": self.kind,
            "input": self._input_quantization(),
            "steps": steps,
        }
        files = {
            QUANTIZATION_FILE: (json.dumps(document, indent=1) + "\n").encode(),
            INTEGER_WEIGHTS_FILE: save({k: np.ascontiguousarray(v) for k, v in integers.items()}),
        }
        return files, notes

    # --- internals ------------------------------------------------------------------------------

    def _conv_steps(self) -> list[Step]:
        return [step for step in self.steps if step.scope is not None]

    def _strided_padding(self) -> tuple[str, ...] | None:
        """How each stride-2 conv pads, in network order, where one pads as Keras' open-size MobileNetV2 does
        (a PAD of (0, 1) where TF's SAME pads otherwise); None where every one pads as TF's SAME."""
        paddings = tuple(step.padding for step in self._conv_steps() if step.op.options.get("stride_h", 1) > 1)
        return paddings if BOTTOM_RIGHT_PADDING in paddings else None

    def _weight_types(self) -> set[str]:
        """The stored types of the conv weights (those behind a DEQUANTIZE op included)."""
        return {self._stored(step.op.inputs[1]).dtype for step in self._conv_steps()}

    def _scheme(self) -> str:
        if self.quantized:
            weight = self.model.tensors[self._conv_steps()[0].op.inputs[1]]
            per = "per-channel" if len(weight.quantization.scale) > 1 else "per-tensor"
            return f"{weight.dtype} weights {per}, {self._activation_dtype()} activations"
        types = self._weight_types()
        if types == {"float32"}:
            return "float32, not quantized"
        if types == {"float16"}:
            return "float16 weights, float32 activations"
        integer = sum(self._stored(step.op.inputs[1]).dtype == "int8" for step in self._conv_steps())
        return (
            f"dynamic range: int8 weights in {integer} of {len(self._conv_steps())} convs, the others "
            f"{'/'.join(sorted(types - {'int8'}))}, float32 activations"
        )

    def _activation_dtype(self) -> str:
        return self.model.tensors[self._conv_steps()[0].op.outputs[0]].dtype

    def _input_quantization(self) -> dict[str, Any] | None:
        first = self.model.tensors[self._conv_steps()[0].op.inputs[0]]
        if first.quantization is None:
            return None
        return {**_params(first), "dtype": first.dtype}

    def _describe(self, step: Step) -> dict[str, Any]:
        output = self.model.tensors[step.output_tensor]
        params = _params(output) if output.quantization is not None else None
        record: dict[str, Any] = {"op": step.op.op, "tensor": output.index, "output": params}
        if step.scope is not None:
            weight = self.model.tensors[step.op.inputs[1]]
            record["scope"] = step.scope
            record["weight_scale"] = [float(s) for s in weight.quantization.scale]
            record["weight_zero_point"] = [int(z) for z in weight.quantization.zero_point]
        for key in ("activation", "align_corners", "half_pixel_centers"):
            if key in step.op.options:
                record[key] = step.op.options[key]
        if "dilation_h" in step.op.options:
            record["stride"], record["dilation"] = step.stride_dilation
        if step.constant is not None:
            record["constant"] = _params(self.model.tensors[step.constant])
        if step.op.op == "RESIZE_BILINEAR":
            record["size"] = list(output.shape[1:3])
        if step.op.op == "SOFTMAX":
            record["beta"] = step.op.options["beta"]
        return record

    def _check_types(self) -> None:
        for step in self._conv_steps():
            # Full-integer kernels take the constants as stored; float ones may widen them (DEQUANTIZE).
            tensor = (lambda i: self.model.tensors[i]) if self.quantized else self._stored
            weight = tensor(step.op.inputs[1])
            bias = tensor(step.op.inputs[2]).dtype if has_bias(step.op) else None
            if self.quantized and (weight.dtype not in ("uint8", "int8") or bias not in ("int32", None)):
                raise TFLiteFormatError(
                    f"{step.scope}: {weight.dtype} weights with {bias} biases; full-integer models must "
                    "use uint8 or int8 weights with int32 biases"
                )
            if not self.quantized and (
                weight.dtype not in FLOAT_MODEL_WEIGHTS or bias not in ("float32", "float16", None)
            ):
                raise TFLiteFormatError(
                    f"{step.scope}: {weight.dtype} weights with {bias} biases on float activations; a float "
                    "model stores float32, float16 or int8 weights and float32 or float16 biases"
                )

    def _check_architecture(self) -> None:
        """Each conv's stride and dilation, and each residual, are those of the variant's model (channels
        are checked by the variant detection, which matches every weight's shape)."""
        shapes = {name: array.shape for name, array in self._tensors.items()}
        variant = detect_variant(
            shapes,
            output_stride=self.output_stride if self.kind == DEEPLAB else None,
            hidden_activations=self.hidden_activations,
        )
        config = variant.config()
        expected = {"mobilenet_v2.conv_stem.first_conv": (2, 1)}
        residual = {"mobilenet_v2.conv_stem": False}
        channels = block_channels(config)[1:]
        for i, ((stride, dilation), (in_channels, _, out_channels)) in enumerate(
            zip(block_schedule(config), channels, strict=True)
        ):
            expected[f"mobilenet_v2.layer.{i}.conv_3x3"] = (stride, dilation)
            residual[f"mobilenet_v2.layer.{i}"] = stride == 1 and in_channels == out_channels
        for step in self._conv_steps():
            if step.op.op == "FULLY_CONNECTED":
                continue
            found, wanted = step.stride_dilation, expected.get(step.name, (1, 1))
            if found != wanted:
                raise MappingError(
                    f"{step.scope}: op {step.op.index} has stride {found[0]} and dilation {found[1]}, but "
                    f"{variant.name} has stride {wanted[0]} and dilation {wanted[1]} there"
                )
        names = {step.name for step in self.steps}
        wrong = [block for block, has_add in residual.items() if has_add != (f"{block}.add" in names)]
        if wrong:
            raise MappingError(f"residual ADDs differ from {variant.name}'s at {', '.join(wrong)}")

    def _slim_tensors(self) -> dict[str, np.ndarray]:
        """Dequantized weights in slim layouts, with the folded bias as an identity BatchNorm (a
        BatchNorm the converter left unfolded keeps its scale as gamma)."""
        tensors: dict[str, np.ndarray] = {}
        head = _head_weight(self.kind).rsplit("/", 1)[0]
        constants = {
            step.name: _dequantize(self.model, self._stored(step.constant)).reshape(-1)
            for step in self.steps
            if step.constant is not None
        }
        for step in self._conv_steps():
            weight = _slim_layout(step.op.op, _dequantize(self.model, self._stored(step.op.inputs[1])))
            bias = _dequantize(self.model, self._stored(step.op.inputs[2])) if has_bias(step.op) else None
            if bias is None:
                bias = np.zeros(weight.shape[-1], np.float32)
            if step.scope == head or step.op.op == "FULLY_CONNECTED":  # the classifier, a hidden Dense layer
                tensors[f"{step.scope}/weights"], tensors[f"{step.scope}/biases"] = weight, bias
                continue
            variable = "depthwise_weights" if step.op.op == "DEPTHWISE_CONV_2D" else "weights"
            eps = HEAD_EPS if step.scope in HEAD_SCOPES else BACKBONE_EPS
            # A BatchNorm the converter left unfolded, in part or whole: (conv + bias) * gamma + beta.
            gamma = constants.get(f"{step.name}.mul", np.ones_like(bias))
            bias = bias * gamma + constants.get(f"{step.name}.bias_add", np.zeros_like(bias))
            tensors[f"{step.scope}/{variable}"] = weight
            tensors[f"{step.scope}/BatchNorm/gamma"] = gamma
            tensors[f"{step.scope}/BatchNorm/beta"] = bias
            tensors[f"{step.scope}/BatchNorm/moving_mean"] = np.zeros_like(bias)
            tensors[f"{step.scope}/BatchNorm/moving_variance"] = np.full_like(bias, 1.0 - eps)
        return tensors


def _drop_background(steps: dict[str, dict[str, Any]], integers: dict[str, np.ndarray]) -> list[str]:
    """The integer classifier without its first output (the background class): each output channel is
    computed and requantized on its own, so the 1000 kept are TFLite's exactly. The softmax and what
    follows it go: TFLite normalises over all 1001 logits, which the 1000 kept cannot reproduce."""
    classifier = steps["classifier"]
    for key in ("weight", "bias"):
        integers[f"classifier.{key}"] = integers[f"classifier.{key}"][1:]
    for key in ("weight_scale", "weight_zero_point"):
        if len(classifier[key]) > 1:  # per channel
            classifier[key] = classifier[key][1:]
    if "softmax" not in steps:
        return []
    names = list(steps)
    for name in names[names.index("softmax") :]:
        del steps[name]
    return [
        f"the integer model ({QUANTIZATION_FILE}) keeps TFLite's integer logits of the 1000 classes but not its "
        "softmax, which normalises over all 1001 and cannot be reproduced without the background class"
    ]


def _head_weight(kind: str) -> str:
    return next(tf for tf, _, _, k in HEADS if k == kind and tf.endswith("/weights"))


def _params(tensor: Tensor) -> dict[str, Any]:
    """Per-tensor quantization of an activation, as JSON (float32 scales are exact as Python floats)."""
    quantization = tensor.quantization
    if quantization is None or len(quantization.scale) != 1:
        raise TFLiteFormatError(f"activation {tensor.name!r} is not quantized per tensor")
    return {"scale": float(quantization.scale[0]), "zero_point": int(quantization.zero_point[0])}


def _dequantize(model: Model, tensor: Tensor) -> np.ndarray:
    values = model.data(tensor)
    if values is None:
        raise TFLiteFormatError(f"constant tensor {tensor.name!r} has no data")
    quantization = tensor.quantization
    if values.dtype == np.float32:
        return values
    if values.dtype == np.float16:  # TFLite's DEQUANTIZE widens float16 exactly
        return values.astype(np.float32)
    if quantization is None:
        raise TFLiteFormatError(f"tensor {tensor.name!r} is {values.dtype} without quantization parameters")
    shape = [1] * values.ndim
    if len(quantization.scale) > 1:
        if not 0 <= quantization.axis < values.ndim or values.shape[quantization.axis] != len(quantization.scale):
            raise TFLiteFormatError(f"tensor {tensor.name!r}: {len(quantization.scale)} scales do not fit its shape")
        shape[quantization.axis] = -1
    scale = quantization.scale.astype(np.float64).reshape(shape)
    zero_point = quantization.zero_point.reshape(shape)
    return (scale * (values.astype(np.int64) - zero_point)).astype(np.float32)


def _slim_layout(op: str, weight: np.ndarray) -> np.ndarray:
    """TFLite conv [out, h, w, in] and depthwise [1, h, w, c] -> slim [h, w, in, out] / [h, w, c, 1]."""
    if op == "FULLY_CONNECTED":  # [out, in] -> a 1x1 conv [1, 1, in, out]
        return np.ascontiguousarray(weight.T[None, None])
    return np.ascontiguousarray(weight.transpose(1, 2, 3, 0))


def _torch_layout(op: str, weight: np.ndarray) -> np.ndarray:
    """TFLite layouts -> PyTorch conv [out, in, h, w] (depthwise [c, 1, h, w]) for the integer model."""
    if op == "FULLY_CONNECTED":
        return weight[:, :, None, None]
    if op == "DEPTHWISE_CONV_2D":
        return weight.transpose(3, 0, 1, 2)
    return weight.transpose(0, 3, 1, 2)


def _output_stride(steps: list[Step]) -> int:
    """The product of the backbone's strides (DeepLab trades the rest for dilation)."""
    stride = 1
    for step in steps:
        if step.scope is not None and step.scope.startswith("MobilenetV2/"):
            stride *= step.stride_dilation[0]
    return stride
