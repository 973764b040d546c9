"""Building blocks: a TF-exact conv + BatchNorm + activation, and the inverted residual block.

Submodule names (`convolution`, `normalization`, `expand_1x1`, `conv_3x3`, `reduce_1x1`) follow
transformers' MobileNetV2 so that state dicts are interchangeable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU}


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) along one axis of length `size`."""
    effective_kernel = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


class ConvLayer(nn.Module):
    """Conv2d (+ BatchNorm) (+ activation) with TensorFlow 'SAME' padding at any input size.

    With stride 1 TF's padding is symmetric and independent of the input size, so it lives inside the
    convolution. With stride 2 it depends on the parity of the input (0/1 at even sizes, 1/1 at odd
    ones), so it is decided per call from the input shape: symmetric sizes still pad inside the
    convolution and only the asymmetric case pays for an explicit pad.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
        norm_eps: float | None = 1e-3,
        activation: str | None = "relu6",
    ) -> None:
        super().__init__()
        self.stride = stride
        symmetric_padding = same_padding(1, kernel_size, 1, dilation)[0] if stride == 1 else 0
        self.convolution = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=symmetric_padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.normalization = (
            nn.BatchNorm2d(out_channels, eps=norm_eps, momentum=0.003) if norm_eps is not None else None
        )
        self.activation = ACTIVATIONS[activation](inplace=True) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._convolve(x) if self.stride > 1 else self.convolution(x)
        if self.normalization is not None:
            x = self.normalization(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.convolution
        kernel, dilation = conv.kernel_size[0], conv.dilation[0]
        top, bottom = same_padding(x.shape[-2], kernel, self.stride, dilation)
        left, right = same_padding(x.shape[-1], kernel, self.stride, dilation)
        if top == bottom and left == right:
            padding = (top, left)
        else:
            x = F.pad(x, (left, right, top, bottom))
            padding = (0, 0)
        return F.conv2d(x, conv.weight, conv.bias, self.stride, padding, conv.dilation, conv.groups)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm into the convolution (inference only)."""
        norm = self.normalization
        if norm is None:
            return
        conv = self.convolution
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias)
        self.normalization = None


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), with a residual when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        expanded_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        norm_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand_1x1 = (
            ConvLayer(in_channels, expanded_channels, 1, norm_eps=norm_eps)
            if expanded_channels != in_channels
            else None
        )
        self.conv_3x3 = ConvLayer(
            expanded_channels,
            expanded_channels,
            3,
            stride=stride,
            groups=expanded_channels,
            dilation=dilation,
            norm_eps=norm_eps,
        )
        self.reduce_1x1 = ConvLayer(expanded_channels, out_channels, 1, norm_eps=norm_eps, activation=None)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.expand_1x1 is None else self.expand_1x1(x)

    def project(self, expanded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce_1x1(self.conv_3x3(expanded))
        return x + out if self.use_residual else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.expand(x), x)
