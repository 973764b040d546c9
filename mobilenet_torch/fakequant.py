"""The fake-quant model of a quantization-aware (tf.contrib.quantize) MobileNetV2 classifier.

A folder converted from such a checkpoint holds, besides the float model, ``fake_quantization.json``:
``{"format", "source", "bits", "steps": {step: {"weights": {"min", "max"}, "output": {"min", "max"}}}}``.
A step is a conv layer by our module path (``mobilenet_v2.layer.3.conv_3x3``, ``classifier``), with the
range of its BatchNorm-folded kernel and of its output, or a residual add (``mobilenet_v2.layer.3.add``)
with the range of its output.

:class:`FakeQuantMobileNetV2` computes what the rewriter's eval graph computes:

- BatchNorm folded with the moving statistics: kernel x gamma / sqrt(moving_variance + eps), bias
  beta - moving_mean x that scale;
- ``FakeQuantWithMinMaxVars`` with TF's nudging (the zero point rounded onto the integer grid, the range
  moved with it; values clamped, then rounded half up on that grid), 8 bits: on the folded kernels with
  the narrow range [1, 255], on every layer's output after its ReLU6 (the linear project layers and the
  logits too) and on every residual add, with the full range [0, 255];
- the pooled features and the input unquantized, as the rewriter leaves them.

>>> model = FakeQuantMobileNetV2.from_pretrained("out/quantized_v2_224_100")
>>> logits = model(pixel_values)             # NCHW in [-1, 1] -> [N, classes]
>>> steps = model.run(pixel_values)          # every step's output, by step name
>>> steps = model.run(pixel_values, feed=reference_steps)  # each step from the reference's inputs
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architecture import BACKBONE_PREFIX
from .errors import ModelFolderError
from .layers import ConvLayer
from .quantized_files import FAKE_QUANTIZATION_FILE, FAKE_QUANTIZATION_FORMAT


def nudged_range(low: float, high: float, bits: int, narrow_range: bool) -> tuple[float, float, float]:
    """TF's Nudge: (nudged min, nudged max, scale), in float32 as the kernel computes them."""
    quant_min, quant_max = (1 if narrow_range else 0), (1 << bits) - 1
    low32, high32 = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    scale = (high32 - low32) / (quant_max - quant_min)
    zero_point_from_min = quant_min - low32 / scale
    if zero_point_from_min < quant_min:
        zero_point = torch.tensor(float(quant_min))
    elif zero_point_from_min > quant_max:
        zero_point = torch.tensor(float(quant_max))
    else:  # std::round: half away from zero (the zero point is positive here)
        zero_point = torch.floor(zero_point_from_min + 0.5)
    return float((quant_min - zero_point) * scale), float((quant_max - zero_point) * scale), float(scale)


def fake_quant(x: torch.Tensor, low: float, high: float, bits: int = 8, narrow_range: bool = False) -> torch.Tensor:
    """FakeQuantWithMinMaxVars: clamp to the nudged range, round half up onto its grid."""
    nudged_min, nudged_max, scale = nudged_range(low, high, bits, narrow_range)
    inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    shifted = x.clamp(nudged_min, nudged_max) - nudged_min
    return torch.floor(shifted * inverse + 0.5) * scale + nudged_min


class FakeQuantConv(nn.Module):
    """A conv layer (or the classifier) with its BatchNorm folded, its kernel fake-quantized (narrow
    range), then its activation and the fake quant of its output."""

    def __init__(self, layer: nn.Module, record: dict[str, Any], bits: int) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        if isinstance(self.layer, ConvLayer):
            self._fold(self.layer)
            parameter = self.layer.convolution.weight
        else:
            parameter = self.layer.weight
        weights, self.output, self.bits = record["weights"], record["output"], bits
        with torch.no_grad():
            parameter.copy_(fake_quant(parameter, weights["min"], weights["max"], bits, narrow_range=True))

    @staticmethod
    @torch.no_grad()
    def _fold(layer: ConvLayer) -> None:
        """fold_batch_norms' eval folding, in float32: scale = gamma * rsqrt(variance + eps)."""
        norm, conv = layer.normalization, layer.convolution
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter(norm.bias - norm.running_mean * scale)
        layer.normalization = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(self.layer(x), self.output["min"], self.output["max"], self.bits)


class FakeQuantMobileNetV2(nn.Module):
    """The rewriter's eval graph of a MobileNetV2 classifier; see the module docstring."""

    def __init__(self, float_model: nn.Module, ranges: dict[str, Any]) -> None:
        super().__init__()
        if ranges.get("format") != FAKE_QUANTIZATION_FORMAT:
            raise ModelFolderError(f"{FAKE_QUANTIZATION_FILE} is not in the format {FAKE_QUANTIZATION_FORMAT!r}")
        self.bits = int(ranges["bits"])
        self.records: dict[str, dict[str, Any]] = ranges["steps"]
        self.backbone = float_model.mobilenet_v2
        self.layers = nn.ModuleDict()
        for name, record in self.records.items():
            if "weights" in record:
                self.layers[_key(name)] = FakeQuantConv(float_model.get_submodule(name), record, self.bits)
        missing = [name for name in self._expected_steps() if name not in self.records]
        if missing:
            raise ModelFolderError(f"{FAKE_QUANTIZATION_FILE} has no ranges for {', '.join(missing[:3])}")

    def _expected_steps(self) -> list[str]:
        """Every conv layer, the classifier and every residual add, by step name."""
        modules = self.backbone.named_modules(prefix=BACKBONE_PREFIX.rstrip("."))
        names = [name for name, module in modules if isinstance(module, ConvLayer)] + ["classifier"]
        adds = [
            f"{BACKBONE_PREFIX}{step.module}.add"
            for step in self.backbone.steps
            if step.block and self.backbone.get_submodule(step.module).use_residual
        ]
        return names + adds

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> FakeQuantMobileNetV2:
        """Load a folder converted from a quantization-aware checkpoint."""
        from .modeling import MobileNetV2ForImageClassification

        folder = Path(folder)
        if not (folder / FAKE_QUANTIZATION_FILE).is_file():
            raise ModelFolderError(
                f"{folder} has no {FAKE_QUANTIZATION_FILE}: convert a quantization-aware checkpoint to get one"
            )
        ranges = json.loads((folder / FAKE_QUANTIZATION_FILE).read_text())
        return cls(MobileNetV2ForImageClassification.from_pretrained(folder), ranges).eval()

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.run(pixel_values)["classifier"]

    @torch.no_grad()
    def run(self, pixel_values: torch.Tensor, feed: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every step's output (NCHW; the logits [N, classes]) by step name, after its fake quant. `feed`
        (step name -> tensor) replaces those steps' outputs for what follows, as a TF session's feed
        does: fed every step of a reference, each step is computed from the reference's inputs alone."""
        out: dict[str, torch.Tensor] = {}
        feed, x = feed or {}, pixel_values
        for step in self.backbone.steps:
            name = BACKBONE_PREFIX + step.module
            if step.block:
                x = self._block(name, self.backbone.get_submodule(step.module), x, out, feed)
            else:
                x = self._step(name, x, out, feed)
        self._step("classifier", x.mean(dim=(-2, -1)), out, feed)
        return out

    def _step(self, name: str, x: torch.Tensor, out: dict[str, torch.Tensor], feed: dict[str, torch.Tensor]):
        out[name] = self.layers[_key(name)](x)
        return feed.get(name, out[name])

    def _block(self, name: str, block: nn.Module, x: torch.Tensor, out: dict[str, torch.Tensor],
               feed: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        block_input = x
        if block.expand_1x1 is not None:
            x = self._step(f"{name}.expand_1x1", x, out, feed)
        x = self._step(f"{name}.conv_3x3", x, out, feed)
        x = self._step(f"{name}.reduce_1x1", x, out, feed)
        if block.use_residual:
            add = self.records[f"{name}.add"]["output"]
            out[f"{name}.add"] = fake_quant(block_input + x, add["min"], add["max"], self.bits)
            x = feed.get(f"{name}.add", out[f"{name}.add"])
        return x


def _key(name: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return name.replace(".", "__")
