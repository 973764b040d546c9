"""Building blocks: a TF-exact conv + BatchNorm + activation, and the inverted residual block.

Submodule names (`convolution`, `normalization`, `expand_1x1`, `conv_3x3`, `reduce_1x1`) follow
transformers' MobileNetV2 so that state dicts are interchangeable.

Layout: layers are built channels_last, the layout PyTorch's CPU convolution kernels are fastest in, and
keep it when weights are loaded. `model.to(memory_format=torch.contiguous_format)` switches a model
back to NCHW. Only a convolution whose weight has a definite layout (more than one input channel per
group and a kernel larger than 1x1: the stem) can tell the two apart; it brings its input into that
layout, so the whole network runs in the model's layout whatever the layout of the input, and gives
the same result for either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import bottom_right_padding, same_padding
from .configuration import ACTIVATIONS, SAME_PADDING

DEFAULT_MEMORY_FORMAT = torch.channels_last


def memory_format_of(weight: torch.Tensor) -> torch.memory_format:
    """channels_last or contiguous_format, as `weight` is laid out (NCHW when it is both)."""
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def activation_module(name: str) -> nn.Module:
    """The torch module computing transformers' activation `name` (one of `configuration.ACTIVATIONS`)."""
    cls, options = ACTIVATIONS[name]
    return getattr(nn, cls)(**options)


def keep_weight_layout(layer: ConvLayer, state_dict: dict, prefix: str, *_) -> None:
    """Load-state-dict pre-hook: loaded weights take the layer's layout (`assign=True` would impose theirs)."""
    key = prefix + "convolution.weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].contiguous(memory_format=memory_format_of(layer.convolution.weight))


class ConvLayer(nn.Module):
    """Conv2d (+ BatchNorm) (+ activation) with TensorFlow 'SAME' padding at any input size, or (with
    `tf_padding=False`) PyTorch's fixed symmetric padding of (kernel - 1) / 2 x dilation, as transformers.
    With `strided_padding="bottom_right"` a strided conv pads one row and column more after than before
    at every size, as Keras' MobileNetV2 does when built for any input size (see `STRIDED_PADDINGS`).

    With stride 1 TF's padding is symmetric and independent of the input size, so it lives inside the
    convolution. With stride 2 it depends on the input size, so it is decided per call from the shape:
    symmetric (odd sizes) still pads inside the convolution. Asymmetric (even sizes: nothing before,
    one after) would need a padded copy of the input, a whole extra pass over the largest activations of
    the network; the depthwise convolutions avoid it by giving the kernel a leading zero row and column,
    which moves every window one step back, and padding symmetrically by one more. The zero taps add
    exact zeros, so the result is TF's (Keras' for "bottom_right", which is always asymmetric). Dense
    convolutions (the stem, on the 3-channel image) pad the input instead, which is cheaper there than
    the extra taps.
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
        tf_padding: bool = True,
        strided_padding: str = SAME_PADDING,
    ) -> None:
        super().__init__()
        if stride > 1 and dilation > 1:
            raise ValueError("a convolution cannot be both strided and dilated (TensorFlow refuses it too)")
        self.stride = stride
        # Only a strided conv pads by its rule (TF 'SAME' by the input size, or Keras' fixed bottom-right);
        # any other pads symmetrically, as at stride 1.
        self.strided_padding = strided_padding if tf_padding and stride > 1 else None
        self.convolution = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0 if self.strided_padding else same_padding(1, kernel_size, 1, dilation)[0],
            dilation=dilation,
            groups=groups,
            bias=bias,
        ).to(memory_format=DEFAULT_MEMORY_FORMAT)
        self.sets_layout = in_channels // groups > 1 and kernel_size > 1
        self.register_load_state_dict_pre_hook(keep_weight_layout)
        self.normalization = (
            nn.BatchNorm2d(out_channels, eps=norm_eps, momentum=0.003) if norm_eps is not None else None
        )
        self.activation = activation_module(activation) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sets_layout:
            x = x.contiguous(memory_format=memory_format_of(self.convolution.weight))
        x = self._strided_convolution(x) if self.strided_padding else self.convolution(x)
        if self.normalization is not None:
            x = self.normalization(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _strided_convolution(self, x: torch.Tensor) -> torch.Tensor:
        conv, stride, kernel = self.convolution, self.stride, self.convolution.kernel_size[0]
        if self.strided_padding == SAME_PADDING:
            (top, bottom), (left, right) = (same_padding(n, kernel, stride) for n in x.shape[-2:])
        else:  # BOTTOM_RIGHT_PADDING
            top, bottom = left, right = bottom_right_padding(kernel)
        weight, padding = conv.weight, (top, left)
        if (top, left) != (bottom, right):  # one more row (column) after than before
            if conv.groups == 1:
                x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
            else:
                weight, padding = F.pad(weight, (1, 0, 1, 0)), (top + 1, left + 1)
        return F.conv2d(x, weight, conv.bias, stride, padding, 1, conv.groups)

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
        expand: bool = True,
        activation: str = "relu6",
        tf_padding: bool = True,
        strided_padding: str = SAME_PADDING,
    ) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        layer = dict(norm_eps=norm_eps, tf_padding=tf_padding, strided_padding=strided_padding)
        self.expand_1x1 = (
            ConvLayer(in_channels, expanded_channels, 1, activation=activation, **layer) if expand else None
        )
        self.conv_3x3 = ConvLayer(
            expanded_channels,
            expanded_channels,
            3,
            stride=stride,
            groups=expanded_channels,
            dilation=dilation,
            activation=activation,
            **layer,
        )
        self.reduce_1x1 = ConvLayer(expanded_channels, out_channels, 1, activation=None, **layer)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.expand_1x1 is None else self.expand_1x1(x)

    def project(self, expanded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce_1x1(self.conv_3x3(expanded))
        return x + out if self.use_residual else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.expand(x), x)
