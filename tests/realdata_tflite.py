"""Real pretrained weights from quantized TFLite exports, loaded into our (fused) models.

The TFLite files in ../shared/realdata are uint8 per-tensor quantized, with BatchNorm folded into
each conv's weights and bias and ReLU6 fused. Every conv op is matched to a slim scope from the
converter's own table (`converter.slim.conv_layers`) by the scope names kept in its weight
tensor's name, so a wrong row in that table or a layer our model lacks fails loudly here. The
weights are dequantized (real = scale * (q - zero_point)) and written into the fused model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from converter.slim import HEADS, conv_layers
from mobilenet_torch.layers import ConvLayer
from tests.helpers import SHARED

REALDATA = SHARED / "realdata"
MODELS = REALDATA / "models"
IMAGES = REALDATA / "images"
LABELS = REALDATA / "labels"

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass
class TfliteConv:
    """One conv (or fully connected) op of a TFLite graph, dequantized, in PyTorch's layout."""

    index: int
    op: str
    scope: str
    weight: np.ndarray  # [out, in, h, w] (depthwise: [channels, 1, h, w]; fully connected: [out, in])
    bias: np.ndarray
    output_shape: tuple[int, ...]  # NCHW (or [N, out] for fully connected)


def interpreter(path: Path, preserve_all_tensors: bool = False, reference_kernels: bool = False):
    """An allocated interpreter. Preserving every tensor (to read pre-softmax logits) needs the
    built-in kernels, as a delegate keeps its intermediate tensors to itself; `reference_kernels`
    runs TFLite's reference implementations (the specification of its integer arithmetic)."""
    import tensorflow as tf

    kwargs = {"model_path": str(path), "num_threads": 1}
    resolvers = tf.lite.experimental.OpResolverType
    if preserve_all_tensors:
        kwargs["experimental_preserve_all_tensors"] = True
        kwargs["experimental_op_resolver_type"] = resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if reference_kernels:
        kwargs["experimental_op_resolver_type"] = resolvers.BUILTIN_REF
    with warnings.catch_warnings():  # its deprecation notice in favour of the separate LiteRT package
        warnings.simplefilter("ignore", UserWarning)
        result = tf.lite.Interpreter(**kwargs)
    result.allocate_tensors()
    return result


def dequantize(interp, index: int) -> np.ndarray:
    """A tensor's real values; per-tensor quantization is asserted (that is what these files use)."""
    detail = interp._get_tensor_details(index, 0)
    values = interp.get_tensor(index)
    params = detail["quantization_parameters"]
    scales, zero_points = params["scales"], params["zero_points"]
    if values.dtype == np.float32:
        return values
    assert len(scales) == 1, f"{detail['name']}: expected per-tensor quantization, got {len(scales)} scales"
    return (scales[0] * (values.astype(np.float64) - zero_points[0])).astype(np.float32)


def scope_of(weight_name: str, scopes: list[str]) -> str:
    """The single known scope that one of the ';'-joined parts of a weight tensor's name lies in."""
    parts = weight_name.split(";")
    found = [scope for scope in scopes if any(part.startswith(scope + "/") for part in parts)]
    assert len(found) == 1, f"weight {weight_name!r} matches scopes {found}, expected exactly one"
    return found[0]


def _torch_layout(op: str, weight: np.ndarray) -> np.ndarray:
    if op == "CONV_2D":  # [out, h, w, in] -> [out, in, h, w]
        return weight.transpose(0, 3, 1, 2)
    if op == "DEPTHWISE_CONV_2D":  # [1, h, w, channels] -> [channels, 1, h, w]
        return weight.transpose(3, 0, 1, 2)
    return weight  # FULLY_CONNECTED: already [out, in]


def conv_ops(interp, scopes: list[str]) -> list[TfliteConv]:
    """Every conv / fully connected op in graph order, each assigned to one of `scopes`."""
    convs = []
    for op in interp._get_ops_details():
        if op["op_name"] not in CONV_OPS:
            continue
        weight_index, bias_index = op["inputs"][1], op["inputs"][2]
        name = interp._get_tensor_details(weight_index, 0)["name"]
        shape = tuple(int(s) for s in interp._get_tensor_details(op["outputs"][0], 0)["shape"])
        output_shape = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape
        convs.append(
            TfliteConv(
                index=op["index"],
                op=op["op_name"],
                scope=scope_of(name, scopes),
                weight=_torch_layout(op["op_name"], dequantize(interp, weight_index)),
                bias=dequantize(interp, bias_index),
                output_shape=output_shape,
            )
        )
    used = [conv.scope for conv in convs]
    assert sorted(used) == sorted(scopes), f"scopes without a conv op: {sorted(set(scopes) - set(used))}"
    return convs


def count_ops(interp, name: str) -> int:
    return sum(op["op_name"] == name for op in interp._get_ops_details())


def load_tflite_weights(model, interp, kind: str, head_scope: str | None = None) -> dict[str, TfliteConv]:
    """Fuse `model` and fill every conv (and the classifier) from the TFLite graph.

    `kind` is the converter's model kind ("classification" or "deeplab"); `head_scope` overrides the
    classifier's TF scope (the iNat bird model calls it "Logits"). Returns module path -> its op.
    """
    model.fuse()
    modules = {scope: module for scope, module, _, _ in conv_layers(kind)}
    head_weight, head_module = next((tf, pt) for tf, pt, _, k in HEADS if k == kind and pt.endswith(".weight"))
    modules[head_scope or head_weight.rsplit("/", 1)[0]] = head_module.rsplit(".", 1)[0]
    by_module = {}
    with torch.no_grad():
        for conv in conv_ops(interp, list(modules)):
            path = modules[conv.scope]
            module = model.get_submodule(path)
            if isinstance(module, ConvLayer):
                module = module.convolution
            weight = conv.weight
            if isinstance(module, torch.nn.Linear) and weight.ndim == 4:  # the 1x1 logits conv -> Linear
                weight = weight.reshape(weight.shape[:2])
            assert tuple(weight.shape) == tuple(module.weight.shape), f"{path}: {weight.shape} vs {module.weight.shape}"
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            module.bias.copy_(torch.from_numpy(conv.bias))
            by_module[path.removesuffix(".convolution")] = conv
    conv_modules = {name for name, m in model.named_modules() if isinstance(m, ConvLayer)}
    unfilled = conv_modules - set(by_module)
    assert not unfilled, f"convs of our model with no TFLite op: {sorted(unfilled)}"
    return by_module


def record_conv_shapes(model) -> dict[str, tuple[int, ...]]:
    """Hooks that record each ConvLayer's output shape (NCHW) on the next forward."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, ConvLayer):
            module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    return shapes


def quantized_image(path: Path, size: int) -> np.ndarray:
    """The image resized (bilinear) to size x size: the uint8 NHWC tensor the TFLite models take."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)[None]


def pixel_values(quantized: np.ndarray) -> torch.Tensor:
    """The same input as real values, (q - 128) / 128 as the models' input quantization says, NCHW."""
    real = (quantized.astype(np.float32) - 128.0) / 128.0
    return torch.from_numpy(np.ascontiguousarray(real.transpose(0, 3, 1, 2)))


def labels(name: str) -> list[str]:
    return (LABELS / name).read_text().splitlines()
