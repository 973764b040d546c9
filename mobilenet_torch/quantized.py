"""The integer model of a quantized TFLite MobileNetV2, reproduced op by op in PyTorch.

A folder converted from a quantized ``.tflite`` holds, besides the float (dequantized) model:

- ``quantization.json``: ``{"format", "source", "scheme", "kind", "input": {scale, zero_point, dtype},
  "steps": {name: record}}``. Each step is one op of the integer graph, named by our module path
  (``mobilenet_v2.layer.3.conv_3x3``) or by what it does (``mobilenet_v2.layer.3.add``,
  ``mobilenet_v2.pool``, ``softmax``, ``segmentation_head.pool_resize``, ...). A record holds the op,
  its output quantization (``{"scale", "zero_point"}``, real = scale * (q - zero_point)), the fused
  activation, and for convs the weight scales and zero points (one per output channel, or one), stride
  and dilation; ``tensor`` is the index of its output in the source flatbuffer.
- ``quantized.safetensors``: the integer weights (``<module>.weight``, uint8 or int8, PyTorch conv
  layout) and int32 biases (``<module>.bias``, scale = input scale x weight scale).

:class:`QuantizedMobileNetV2` computes what TFLite's reference kernels compute, checked step by step
against them:

- the input quantized with round-half-away-from-zero;
- every conv accumulated exactly and requantized with TFLite's fixed-point multipliers
  (``QuantizeMultiplier``; a rounding doubling high multiply, then a rounding right shift). uint8
  per-tensor layers form the input x weight scale product in float32 before dividing in double, int8
  per-channel ones in double; FULLY_CONNECTED rounds the product once where convs round twice (both as
  measured against the interpreter);
- fused ReLU / ReLU6 as clamps of the quantized range;
- residual ADDs rescaled through TFLite's 20-bit left shift, and the per-channel MUL and / or ADD of a
  BatchNorm the converter left unfolded (after a space-to-batch dilated conv), each its own
  requantization, as is a ReLU6 kept after any conv as an op of its own (RELU6: rescaled, then clamped;
  a MINIMUM / MAXIMUM clamp, whose kernels keep the scale: clamped);
- the average pool's rounded integer mean; MEAN with the division folded into its multiplier;
- a Keras head's Dense layers ahead of the classifier (``classifier_hidden.<j>``, FULLY_CONNECTED steps),
  each requantized and clamped by its fused activation (ReLU or none) like any other conv;
- bilinear resizes (uint8: interpolated in float32 and rounded half up; int8: in 1/1024 fixed point),
  requantizations and concatenations; the ARG_MAX of DeepLab's labels (ties to the first class);
- the outputs dequantized. The softmax is computed in float on the dequantized logits and quantized
  to its output scale (TFLite's own table-based softmax lands within one step of it). A folder converted
  with --drop-background has none: its classifier keeps TFLite's logits of the 1000 classes, but the
  graph's softmax normalises over all 1001 (``probabilities`` is then None).

Exact at float speed (see ``docs/quantized.md``):

- a conv's sums run as float32 convolutions, exact while every partial sum stays within 2^24 (the bound
  is taken from the weights: sum of |w - zw| x 255 per output channel); a conv past it is split along its
  input channels into convolutions that keep it, summed in float64;
- the fixed-point requantization is one floor division, (a m + offset) >> shift, evaluated in float64
  on the accumulator clamped to where the output can change, which keeps every term exact (checked per
  layer; TFLite's int64 arithmetic runs where it cannot be);
- the element-wise steps (ADD, MUL, a separate ReLU6) look up a table of their every result;
- the activations travel as float32 holding the 8-bit values; :meth:`QuantizedMobileNetV2.run` returns
  them as int64.

>>> model = QuantizedMobileNetV2.from_pretrained("out/mobilenet_v2_1.0_224_quant")
>>> probabilities = model(pixel_values).probabilities   # NCHW in [-1, 1], as the float model takes
>>> twin = model.float_twin()                           # the dequantized float model of the same folder
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .architecture import BACKBONE_PREFIX, HIDDEN_CLASSIFIER, backbone_steps
from .configuration import SAME_PADDING, MobileNetV2Config
from .errors import ModelFolderError
from .fixed_point import (
    DTYPE_RANGES,
    FLOAT32_EXACT,
    FloatRequantization,
    activation_range,
    fixed_point,
    float_requantization,
    multiplier_tensors,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_rounding,
    quantize_multiplier,
    round_half_away,
)
from .layers import ConvLayer
from .quantized_files import INTEGER_WEIGHTS_FILE, QUANTIZATION_FILE, QUANTIZATION_FORMAT

# The ops a ReLU6 kept after a conv is written as: a RELU6, or the last op of a MINIMUM / MAXIMUM clamp.
RELU6_OPS = ("RELU6", "MINIMUM", "MAXIMUM")
ADD_LEFT_SHIFT = 20  # TFLite's headroom for 8-bit ADD inputs before rescaling


class QTensor(NamedTuple):
    """Quantized values (NCHW; int64 from `run`, float32 between steps) with real = scale * (values - zero_point)."""

    values: torch.Tensor
    scale: float
    zero_point: int

    def dequantize(self) -> torch.Tensor:
        return (self.values - self.zero_point).to(torch.float32) * self.scale


class QuantizedClassifierOutput(NamedTuple):
    logits: torch.Tensor  # dequantized [N, classes]
    probabilities: torch.Tensor | None  # dequantized softmax output, where the model has one


class QuantizedSegmenterOutput(NamedTuple):
    logits: torch.Tensor  # dequantized [N, classes, h, w] at the feature resolution
    labels: torch.Tensor  # [N, H, W] from the resized logits, as the graph's ARG_MAX


# --- ops -----------------------------------------------------------------------------------------


class QuantizedConv(nn.Module):
    """CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED: exact integer accumulation, then requantization.

    The accumulation runs as float32 convolutions: a product of two offset 8-bit values is at most 255^2,
    so a sum is exact while the sum of |w - zw| x 255 over its terms stays within 2^24. A dense conv whose
    bound exceeds that is split along its input channels into chunks that keep it, each chunk a float32
    conv, summed in float64. The convolutions take the 8-bit values themselves (|x| <= 255 as well): a 1x1
    conv (no padding) takes the input zero point through its bias, others subtract its sums per position."""

    def __init__(self, layout: nn.Module, record: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor, dtype: str):
        super().__init__()
        if isinstance(layout, ConvLayer):
            conv = layout.convolution
            stride, dilation, groups = layout.stride, conv.dilation[0], conv.groups
            # The float layer's rule for a strided conv; padded positions then add nothing to the sums, as
            # TFLite's padding by the input zero point adds nothing to sum (x - zx)(w - zw).
            padding = layout.strided_padding or SAME_PADDING
        else:  # the classifier (Linear): a 1x1 conv on the pooled map
            stride, dilation, groups, padding = 1, 1, 1, SAME_PADDING
        out_channels, in_per_group, kernel, _ = weight.shape
        zero_points = torch.tensor(record["weight_zero_point"], dtype=torch.int64).reshape(-1, 1, 1, 1)
        offset_weight = weight.to(torch.int64) - zero_points
        self.folds_zero_point = kernel == 1
        self.weight_sums = offset_weight.sum(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
        # How far the sum can move the accumulator from the (file's) bias, for 8-bit inputs (|x - zx| <= 255).
        self.sum_bounds = offset_weight.abs().sum(dim=(1, 2, 3)) * 255
        self.chunks = nn.ModuleList()
        for start, stop in _exact_chunks(offset_weight, groups):
            chunk = ConvLayer((stop - start) * groups, out_channels, kernel, stride, groups, dilation, norm_eps=None,
                              activation=None, strided_padding=padding)  # fmt: skip
            chunk.convolution.weight = nn.Parameter(
                offset_weight[:, start:stop].to(torch.float32).contiguous(memory_format=torch.channels_last),
                requires_grad=False,
            )
            chunk.input_channels = slice(start, stop)
            self.chunks.append(chunk)
        self.register_buffer("bias", bias.to(torch.int64).reshape(1, -1, 1, 1))
        self.weight_scale = [float(s) for s in record["weight_scale"]]
        self.per_tensor_float_product = dtype == "uint8" and len(self.weight_scale) == 1
        self.single_rounding = record["op"] == "FULLY_CONNECTED"
        self.requantize = (multiply_by_quantized_multiplier_single_rounding if self.single_rounding
                           else multiply_by_quantized_multiplier)  # fmt: skip
        self.output = record["output"]
        self.range = activation_range(record.get("activation"), self.output["scale"], self.output["zero_point"], dtype)
        self._multipliers: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._float_requantizations: dict[tuple[float, int], FloatRequantization | None] = {}
        self._zero_point_maps: dict[tuple[int, ...], torch.Tensor] = {}

    def multipliers(self, input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output channel: input scale x weight scale / output scale. TFLite divides in double, but
        forms the product of a per-tensor (uint8) layer's scales in float32 first."""
        if input_scale not in self._multipliers:
            if self.per_tensor_float_product:
                products = [float(torch.tensor(input_scale) * torch.tensor(self.weight_scale[0]))]
            else:
                products = [input_scale * w for w in self.weight_scale]
            reals = [product / self.output["scale"] for product in products]
            multiplier, shift = multiplier_tensors(reals)
            self._multipliers[input_scale] = (multiplier.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1))
        return self._multipliers[input_scale]

    def float_requantization(self, x: QTensor, bias: torch.Tensor) -> FloatRequantization | None:
        """The exact float64 requantization for inputs quantized as `x`, with `bias` (see `accumulate`)."""
        key = (x.scale, x.zero_point)
        if key not in self._float_requantizations:
            multiplier, shift = self.multipliers(x.scale)
            formulas = [fixed_point(m, s, self.single_rounding) for m, s in zip(multiplier.flatten().tolist(),
                        shift.flatten().tolist(), strict=True)]  # fmt: skip
            if len(formulas) == 1:
                formulas *= bias.shape[1]
            reach = torch.stack([self.bias.flatten() - self.sum_bounds, self.bias.flatten() + self.sum_bounds], 1)
            self._float_requantizations[key] = float_requantization(
                formulas, bias.flatten().tolist(), reach.tolist(), self.output["zero_point"], *self.range
            )
        return self._float_requantizations[key]

    def accumulate(self, x: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TFLite's int32 accumulator, bias + sum of (x - zx)(w - zw), exactly, as (sums, bias): the sums in
        float32 (float64 when split), the bias per channel as int64, taking a 1x1 conv's input zero point."""
        sums = self._convolve(x.values)
        if self.folds_zero_point:
            return sums, self.bias - x.zero_point * self.weight_sums
        return sums.sub_(self._zero_point_sums(x)), self.bias

    def _convolve(self, values: torch.Tensor) -> torch.Tensor:
        if len(self.chunks) == 1:
            return self.chunks[0](values)
        sums = self.chunks[0](values[:, self.chunks[0].input_channels]).to(torch.float64)
        for chunk in self.chunks[1:]:
            sums += chunk(values[:, chunk.input_channels])
        return sums

    def _zero_point_sums(self, x: QTensor) -> torch.Tensor:
        """What the input zero point adds to each sum: zx x the weights over the image (padding adds none),
        per position of one image. Subtracted in place, it spares a copy of the input less zx."""
        key = (*x.values.shape[1:], x.zero_point)
        if key not in self._zero_point_maps:
            ones = torch.ones((1, *x.values.shape[1:])).contiguous(memory_format=torch.channels_last)
            self._zero_point_maps[key] = self._convolve(ones).mul_(x.zero_point)
        return self._zero_point_maps[key]

    def forward(self, x: QTensor) -> QTensor:
        sums, bias = self.accumulate(x)
        float_requantization = self.float_requantization(x, bias)
        if float_requantization is not None:
            out = float_requantization(sums)
        else:  # where float64 cannot hold it (see `float_requantization`): TFLite's int64 arithmetic itself
            accumulator = sums.to(torch.int64) + bias
            out = self.requantize(accumulator, *self.multipliers(x.scale)) + self.output["zero_point"]
            out = out.clamp(*self.range).to(torch.float32)
        return QTensor(out, self.output["scale"], self.output["zero_point"])


def _exact_chunks(offset_weight: torch.Tensor, groups: int) -> list[tuple[int, int]]:
    """Input channel ranges whose sums stay exact in float32 for 8-bit inputs (see `QuantizedConv`)."""
    bounds = offset_weight.abs().sum(dim=(2, 3)) * 255  # [out, in per group]: each input channel's share
    if int(bounds.sum(dim=1).max()) <= FLOAT32_EXACT:
        return [(0, offset_weight.shape[1])]
    if groups > 1 or int(bounds.max()) > FLOAT32_EXACT:
        raise ModelFolderError(f"{QUANTIZATION_FILE}: a conv whose sums no split keeps exact is not emulated")
    chunks, start, running = [], 0, torch.zeros_like(bounds[:, 0])
    for channel in range(bounds.shape[1]):
        running = running + bounds[:, channel]
        if int(running.max()) > FLOAT32_EXACT:
            chunks.append((start, channel))
            start, running = channel, bounds[:, channel].clone()
    return [*chunks, (start, bounds.shape[1])]


def quantized_add(a: QTensor, b: QTensor, record: dict[str, Any], dtype: str) -> QTensor:
    """TFLite's 8-bit ADD: both inputs shifted left by 20 bits, rescaled to twice the larger input
    scale, summed, then rescaled to the output."""
    out_scale, out_zero = record["output"]["scale"], record["output"]["zero_point"]
    twice_max = 2 * max(a.scale, b.scale)
    scaled = []
    for q in (a, b):
        multiplier, shift = multiplier_tensors([q.scale / twice_max])
        scaled.append(multiply_by_quantized_multiplier(_integers(q) * (1 << ADD_LEFT_SHIFT), multiplier, shift))
    multiplier, shift = multiplier_tensors([twice_max / ((1 << ADD_LEFT_SHIFT) * out_scale)])
    out = multiply_by_quantized_multiplier(scaled[0] + scaled[1], multiplier, shift) + out_zero
    low, high = activation_range(record.get("activation"), out_scale, out_zero, dtype)
    return QTensor(out.clamp(low, high).to(torch.float32), out_scale, out_zero)


def quantized_average_pool(x: QTensor, record: dict[str, Any], dtype: str) -> QTensor:
    """A global AVERAGE_POOL_2D: the integer sum divided by the count, rounded half away from zero."""
    _check_same_params(x, record, "AVERAGE_POOL_2D")
    count = x.values.shape[-2] * x.values.shape[-1]
    total = x.values.to(torch.int64).sum(dim=(-2, -1), keepdim=True)
    mean = torch.div(total + torch.where(total >= 0, count // 2, -(count // 2)), count, rounding_mode="trunc")
    low, high = activation_range(record.get("activation"), x.scale, x.zero_point, dtype)
    return QTensor(mean.clamp(low, high).to(torch.float32), x.scale, x.zero_point)


def quantized_resize_bilinear(x: QTensor, size: tuple[int, int], record: dict[str, Any]) -> QTensor:
    """RESIZE_BILINEAR on 8-bit values: interpolated in float32 and rounded half up, as TFLite's kernel."""
    _check_same_params(x, record, "RESIZE_BILINEAR")
    if record.get("half_pixel_centers"):
        raise ModelFolderError(f"{QUANTIZATION_FILE}: half-pixel-centre resizes are not emulated")
    values = x.values
    for axis, out_size in ((-2, size[0]), (-1, size[1])):
        in_size = values.shape[axis]
        scale = in_size / out_size
        if record.get("align_corners") and out_size > 1:
            scale = (in_size - 1) / (out_size - 1)
        position = torch.arange(out_size, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
        low = position.floor().to(torch.int64).clamp(max=in_size - 1)
        high = (low + 1).clamp(max=in_size - 1)
        fraction = position - low.to(torch.float32)
        shape = [1] * values.ndim
        shape[axis] = out_size
        fraction = fraction.reshape(shape)
        values = _take(values, axis, low).mul_(1 - fraction).add_(_take(values, axis, high).mul_(fraction))
    return QTensor(values.add_(0.5).floor_(), x.scale, x.zero_point)


def quantized_resize_bilinear_integer(x: QTensor, size: tuple[int, int], record: dict[str, Any]) -> QTensor:
    """RESIZE_BILINEAR on int8 values: TFLite's fixed-point version, positions in 1/1024 steps. Its integers
    (at most 128 x 2^20) are exact in float64."""
    _check_same_params(x, record, "RESIZE_BILINEAR")
    if record.get("half_pixel_centers"):
        raise ModelFolderError(f"{QUANTIZATION_FILE}: half-pixel-centre resizes are not emulated")
    values = x.values.to(torch.float64)
    weights = []
    for axis, out_size in ((-2, size[0]), (-1, size[1])):
        in_size = values.shape[axis]
        if record.get("align_corners") and out_size > 1:
            scale = ((1 << 10) * (in_size - 1) + (out_size - 1) // 2) // (out_size - 1)
        else:
            scale = ((1 << 10) * in_size + out_size // 2) // out_size
        position = torch.arange(out_size, dtype=torch.int64) * scale
        low = (position // (1 << 10)).clamp(min=0)
        high = torch.div(position + (1 << 10) - 1, 1 << 10, rounding_mode="floor").clamp(max=in_size - 1)
        fraction = position - (1 << 10) * low
        shape = [1] * values.ndim
        shape[axis] = out_size
        weights.append((low, high, fraction.reshape(shape).to(torch.float64)))
    (y0, y1, fy), (x0, x1, fx) = weights
    one = 1 << 10
    # The sum of the four weighted corners, grouped by column: every partial sum is an exact integer.
    columns = _take(values, -2, y0).mul_(one - fy).add_(_take(values, -2, y1).mul_(fy))
    total = _take(columns, -1, x0).mul_(one - fx).add_(_take(columns, -1, x1).mul_(fx))
    # (total +- 2^19) / 2^20 truncated; at 0 either sign gives 0
    rounded = total.add_(torch.copysign(torch.tensor(2.0**19, dtype=torch.float64), total)).mul_(2.0**-20).trunc_()
    return QTensor(rounded.to(torch.float32), x.scale, x.zero_point)


def _take(values: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """`values.index_select(axis, index)`, with the axis moved first: whole rows are copied at once, where
    selecting along an inner axis goes value by value (tens of times slower on a large map)."""
    return values.movedim(axis, 0).contiguous().index_select(0, index).movedim(0, axis)


def quantized_mul(x: QTensor, constant: QTensor, record: dict[str, Any], dtype: str) -> QTensor:
    """MUL of 8-bit tensors: the product of the offset values, requantized."""
    out_scale, out_zero = record["output"]["scale"], record["output"]["zero_point"]
    multiplier, shift = multiplier_tensors([x.scale * constant.scale / out_scale])
    product = _integers(x) * _integers(constant)
    out = multiply_by_quantized_multiplier(product, multiplier, shift) + out_zero
    low, high = activation_range(record.get("activation"), out_scale, out_zero, dtype)
    return QTensor(out.clamp(low, high).to(torch.float32), out_scale, out_zero)


def quantized_pool(x: QTensor, record: dict[str, Any], dtype: str) -> QTensor:
    """The global pool: AVERAGE_POOL_2D, or a MEAN over height and width (which may rescale)."""
    if record["op"] == "AVERAGE_POOL_2D":
        return quantized_average_pool(x, record, dtype)
    out_scale, out_zero = record["output"]["scale"], record["output"]["zero_point"]
    count = x.values.shape[-2] * x.values.shape[-1]
    total = _integers(x).sum(dim=(-2, -1), keepdim=True)
    # TFLite folds the division into the multiplier: (multiplier << k) / count, shift reduced by k.
    multiplier, shift = quantize_multiplier(x.scale / out_scale)
    headroom = min(count.bit_length() - 1, 32, 31 + shift)
    divided = torch.tensor([(multiplier << headroom) // count])
    mean = multiply_by_quantized_multiplier(total, divided, torch.tensor([shift - headroom]))
    return QTensor((mean + out_zero).clamp(*DTYPE_RANGES[dtype]).to(torch.float32), out_scale, out_zero)


def quantized_requantize(x: QTensor, record: dict[str, Any], dtype: str, activation: str | None = None) -> QTensor:
    """QUANTIZE from one 8-bit scale to another; with an activation, RELU / RELU6 (TFLite's ReluX: the
    same rescaling, clamped to the activation's quantized range)."""
    out_scale, out_zero = record["output"]["scale"], record["output"]["zero_point"]
    multiplier, shift = multiplier_tensors([x.scale / out_scale])
    out = multiply_by_quantized_multiplier(_integers(x), multiplier, shift) + out_zero
    out = out.clamp(*activation_range(activation, out_scale, out_zero, dtype))
    return QTensor(out.to(torch.float32), out_scale, out_zero)


def quantized_concat(parts: list[QTensor], record: dict[str, Any], dtype: str) -> QTensor:
    """CONCATENATION along channels; an input on another scale is rescaled in float and rounded."""
    out_scale, out_zero = record["output"]["scale"], record["output"]["zero_point"]
    rescaled = []
    for part in parts:
        if (part.scale, part.zero_point) == (out_scale, out_zero):
            rescaled.append(part.values)
            continue
        scale = torch.tensor(part.scale, dtype=torch.float32) / torch.tensor(out_scale, dtype=torch.float32)
        real = part.values * scale - part.zero_point * scale
        rescaled.append((round_half_away(real) + out_zero).clamp(*DTYPE_RANGES[dtype]))
    return QTensor(torch.cat(rescaled, dim=1), out_scale, out_zero)


def quantized_softmax(logits: QTensor, record: dict[str, Any], dtype: str) -> QTensor:
    beta = record.get("beta", 1.0)
    probabilities = torch.softmax(beta * logits.dequantize().to(torch.float64), dim=1)
    out_scale, out_zero = record["output"]["scale"], record["output"]["zero_point"]
    values = round_half_away(probabilities / out_scale) + out_zero
    return QTensor(values.clamp(*DTYPE_RANGES[dtype]).to(torch.float32), out_scale, out_zero)


def _integers(x: QTensor) -> torch.Tensor:
    """The offset values q - zero_point as int64, for TFLite's fixed-point arithmetic."""
    return x.values.to(torch.int64) - x.zero_point


def _check_same_params(x: QTensor, record: dict[str, Any], op: str) -> None:
    if (x.scale, x.zero_point) != (record["output"]["scale"], record["output"]["zero_point"]):
        raise ModelFolderError(f"{QUANTIZATION_FILE}: a {op} that changes the quantization is not emulated")


# --- the model -------------------------------------------------------------------------------------


class QuantizedMobileNetV2(nn.Module):
    """TFLite's integer MobileNetV2 (classifier or DeepLab v3), step by step; see the module docstring."""

    def __init__(self, config: MobileNetV2Config, quantization: dict[str, Any], integers: dict[str, torch.Tensor],
                 folder: Path | None = None) -> None:  # fmt: skip
        super().__init__()
        if quantization.get("format") != QUANTIZATION_FORMAT:
            raise ModelFolderError(f"{QUANTIZATION_FILE} is not in the format {QUANTIZATION_FORMAT!r}")
        self.config = config
        self.kind = quantization["kind"]
        self.input_params = quantization["input"]
        self.dtype = self.input_params["dtype"]
        self.records: dict[str, dict[str, Any]] = quantization["steps"]
        self.folder = folder
        with torch.device("meta"):
            layout = self._float_class()(config)
        self.convs = nn.ModuleDict()
        self._tables: dict[tuple, tuple[torch.Tensor, float, int]] = {}
        self.constants = {
            name: QTensor(integers[f"{name}.constant"].to(torch.int64).reshape(1, -1, 1, 1), **record["constant"])
            for name, record in self.records.items()
            if "constant" in record
        }
        # The ops the converter kept after a conv (``<conv>.mul``, ``<conv>.bias_add``, ``<conv>.relu6``), in
        # the graph's order: each is its own requantization.
        self.after_conv: dict[str, list[str]] = {name: [] for name, r in self.records.items() if "weight_scale" in r}
        for name in self.records:
            if name.rpartition(".")[0] in self.after_conv:
                self.after_conv[name.rpartition(".")[0]].append(name)
        for name, record in self.records.items():
            if "weight_scale" in record:
                module = layout.get_submodule(name)
                weight, bias = integers[f"{name}.weight"], integers[f"{name}.bias"]
                self.convs[_key(name)] = QuantizedConv(module, record, weight, bias, self.dtype)

    def _float_class(self):
        from .modeling import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation

        return MobileNetV2ForSemanticSegmentation if self.kind == "deeplab" else MobileNetV2ForImageClassification

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> QuantizedMobileNetV2:
        """Load a folder converted from a quantized TFLite model."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (QUANTIZATION_FILE, INTEGER_WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise ModelFolderError(f"{folder} has no {name}: convert a quantized .tflite model to get one")
        quantization = json.loads((folder / QUANTIZATION_FILE).read_text())
        config = MobileNetV2Config.from_pretrained(folder)
        return cls(config, quantization, load_file(folder / INTEGER_WEIGHTS_FILE), folder).eval()

    def float_twin(self) -> nn.Module:
        """The dequantized float model of the same folder (`model.safetensors`, BatchNorm as identity)."""
        if self.folder is None:
            raise ModelFolderError("this quantized model was not loaded from a folder; it has no float twin")
        return self._float_class().from_pretrained(self.folder)

    def quantize_input(self, pixel_values: torch.Tensor) -> QTensor:
        """Real NCHW input -> the model's input quantization (round half away from zero, clamped)."""
        scale, zero_point = self.input_params["scale"], self.input_params["zero_point"]
        quotient = pixel_values.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)
        values = (round_half_away(quotient) + zero_point).clamp(*DTYPE_RANGES[self.dtype])
        return QTensor(values, scale, zero_point)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor):
        steps = self._run(pixel_values, _HeadOutputs(self._backbone_modules()))
        if self.kind == "deeplab":
            return QuantizedSegmenterOutput(steps["segmentation_head.classifier"].dequantize(), steps["labels"].values)
        logits = steps["classifier"].dequantize().flatten(1)
        softmax = steps.get("softmax")
        return QuantizedClassifierOutput(logits, softmax.dequantize().flatten(1) if softmax is not None else None)

    @torch.no_grad()
    def run(self, pixel_values: torch.Tensor) -> dict[str, QTensor]:
        """The output of every step (NCHW, int64 values), by step name, as `quantization.json` names them."""
        steps = self._run(pixel_values, {})
        return {name: QTensor(q.values.to(torch.int64), q.scale, q.zero_point) for name, q in steps.items()}

    def _backbone_modules(self) -> list[str]:
        return ["input"] + [BACKBONE_PREFIX + step.module for step in backbone_steps(final_conv=self.kind != "deeplab")]

    def _run(self, pixel_values: torch.Tensor, out: dict[str, QTensor]) -> dict[str, QTensor]:
        """Every step into `out`; the values are integers held in float32, as the convolutions take them."""
        x = out["input"] = self.quantize_input(pixel_values)
        for step in backbone_steps(final_conv=self.kind != "deeplab"):
            name = BACKBONE_PREFIX + step.module
            x = self._block(name, x, out) if step.block else self._conv(name, x, out)
        if self.kind == "deeplab":
            self._deeplab_head(x, pixel_values.shape[-2:], out)
        else:
            self._classification_head(x, out)
        return out

    def _resize(self, x: QTensor, size: tuple[int, int], record: dict[str, Any]) -> QTensor:
        """uint8 models resize in float (the reference kernel's uint8 path), int8 in fixed point."""
        return _resize_for(self.dtype)(x, size, record)

    def _conv(self, name: str, x: QTensor, out: dict[str, QTensor]) -> QTensor:
        x = out[name] = self.convs[_key(name)](x)
        for step in self.after_conv[name]:  # a BatchNorm the converter left unfolded, a separate ReLU6
            x = out[step] = self._after_conv(step, x)
        return x

    def _after_conv(self, name: str, x: QTensor) -> QTensor:
        record = self.records[name]
        if record["op"] == "MUL":
            return self._tabulated(name, lambda a, b: quantized_mul(a, b, record, self.dtype), x, self.constants[name])
        if record["op"] == "ADD":
            return self._tabulated(name, lambda a, b: quantized_add(a, b, record, self.dtype), x, self.constants[name])
        if record["op"] in RELU6_OPS:
            return self._tabulated(name, lambda a: quantized_requantize(a, record, self.dtype, "relu6"), x)
        raise ModelFolderError(f"{QUANTIZATION_FILE}: step {name} ({record['op']}) after a conv is not emulated")

    def _tabulated(self, name: str, function: Callable[..., QTensor], *inputs: QTensor) -> QTensor:
        """Step `name`, an op on one or two 8-bit tensors value by value, as a lookup in the table of its
        every result: made once per input quantization by `function` itself (TFLite's integer arithmetic),
        it costs one gather per value where the arithmetic costs dozens of int64 passes."""
        key = (name, *((q.scale, q.zero_point) for q in inputs))
        if key not in self._tables:
            low, high = DTYPE_RANGES[self.dtype]
            levels = torch.arange(low, high + 1, dtype=torch.float32)
            grids = [grid.reshape(1, 1, 1, -1) for grid in torch.meshgrid(*[levels] * len(inputs), indexing="ij")]
            results = function(*(QTensor(grid, q.scale, q.zero_point) for grid, q in zip(grids, inputs, strict=True)))
            table = torch.empty(len(levels) ** len(inputs))
            table[_table_index(grids).flatten()] = results.values.flatten()
            self._tables[key] = (table, results.scale, results.zero_point)
        table, scale, zero_point = self._tables[key]
        return QTensor(table[_table_index([q.values for q in inputs])], scale, zero_point)

    def _block(self, name: str, x: QTensor, out: dict[str, QTensor]) -> QTensor:
        block_input = x
        if f"{name}.expand_1x1" in self.records:
            x = self._conv(f"{name}.expand_1x1", x, out)
        x = self._conv(f"{name}.conv_3x3", x, out)
        x = self._conv(f"{name}.reduce_1x1", x, out)
        if f"{name}.add" in self.records:
            record = self.records[f"{name}.add"]
            add = self._tabulated(f"{name}.add", lambda a, b: quantized_add(a, b, record, self.dtype), block_input, x)
            x = out[f"{name}.add"] = add
        return x

    def _classification_head(self, x: QTensor, out: dict[str, QTensor]) -> None:
        x = out["mobilenet_v2.pool"] = quantized_pool(x, self.records["mobilenet_v2.pool"], self.dtype)
        # A Keras head's Dense layers ahead of the classifier, each with its own activation.
        for name in [name for name in self.after_conv if name.startswith(HIDDEN_CLASSIFIER)]:
            x = self._conv(name, x, out)
        logits = self._conv("classifier", x, out)
        if "softmax" in self.records:
            out["softmax"] = quantized_softmax(logits, self.records["softmax"], self.dtype)

    def _deeplab_head(self, features: QTensor, image_size: tuple[int, int], out: dict[str, QTensor]) -> None:
        records, head = self.records, "segmentation_head"
        pooled = out[f"{head}.pool"] = quantized_pool(features, records[f"{head}.pool"], self.dtype)
        pooled = self._conv(f"{head}.conv_pool", pooled, out)
        feature_size = tuple(features.values.shape[-2:])
        pooled = out[f"{head}.pool_resize"] = self._resize(pooled, feature_size, records[f"{head}.pool_resize"])
        if f"{head}.pool_requantize" in records:
            pooled = out[f"{head}.pool_requantize"] = quantized_requantize(
                pooled, records[f"{head}.pool_requantize"], self.dtype
            )
        aspp = self._conv(f"{head}.conv_aspp", features, out)
        concat = out[f"{head}.concat"] = quantized_concat([pooled, aspp], records[f"{head}.concat"], self.dtype)
        x = self._conv(f"{head}.conv_projection", concat, out)
        x = self._conv(f"{head}.classifier", x, out)
        resizes = sorted(name for name in records if name.startswith(f"{head}.logits_resize."))
        for i, name in enumerate(resizes):
            # The last resize goes to the input size; earlier ones to the size the graph recorded.
            size = tuple(image_size) if i == len(resizes) - 1 else tuple(records[name]["size"])
            x = out[name] = self._resize(x, size, records[name])
        out["labels"] = QTensor(channel_argmax(x.values), 1.0, 0)


class _HeadOutputs(dict):
    """Step outputs that keep only the heads' (what `forward` reads): a backbone step's output is let go as
    soon as the next step has read it, so that its memory is reused."""

    def __init__(self, backbone_modules: list[str]) -> None:
        super().__init__()
        self.backbone_modules = tuple(backbone_modules)
        self.backbone_prefixes = tuple(module + "." for module in backbone_modules)

    def __setitem__(self, name: str, value: QTensor) -> None:
        if name not in self.backbone_modules and not name.startswith(self.backbone_prefixes):
            super().__setitem__(name, value)


def channel_argmax(values: torch.Tensor) -> torch.Tensor:
    """ARG_MAX over the channels of NCHW `values`, ties to the first, as a running maximum: one pass per
    channel over a map, several times faster than `argmax(dim=1)` reducing along a strided axis."""
    best, labels = values[:, 0], torch.zeros(values[:, 0].shape, dtype=torch.int64)
    for channel in range(1, values.shape[1]):
        labels.masked_fill_(values[:, channel] > best, channel)
        best = torch.maximum(best, values[:, channel])
    return labels


def _table_index(values: list[torch.Tensor]) -> torch.Tensor:
    """One or two 8-bit values -> their place in a table of 256 or 65536 (a negative index counts from its
    end, so that int8 values need no offset)."""
    index = values[0] if len(values) == 1 else torch.add(values[1], values[0], alpha=1 << 8)
    return index.to(torch.int64)


def _resize_for(dtype: str):
    return quantized_resize_bilinear if dtype == "uint8" else quantized_resize_bilinear_integer


def _key(name: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return name.replace(".", "__")
