"""THE table: which TF variable becomes which PyTorch tensor, and how its layout changes.

Everything here is data. `LAYERS` lists every conv layer once (TF scope, PyTorch module, conv kind);
`LAYER_PARAMS` says which variables a conv+BatchNorm layer holds; `HEADS` adds the classifier
weights. `rules_for(kind)` expands them into flat `Rule`s and `apply_rules` is the one loop that uses
them, proving that every variable is consumed and every tensor of the model filled.
`ENDPOINTS` relates slim endpoint names to graph tensors and module paths (for the verifier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from converter.errors import MappingError
from converter.vocabulary import ARCHITECTURES, BACKBONE, CLASSIFICATION, DEEPLAB
from mobilenet_torch.architecture import ARCHITECTURES as MODEL_LAYOUTS

NUM_BLOCKS = 16
# The backbone rows name modules as the classification and segmentation models hold them; a backbone
# model (MobileNetV2Model) holds them at its top level, without this prefix.
BACKBONE_MODULE_PREFIX = "mobilenet_v2."
BACKBONE_KINDS = (CLASSIFICATION, DEEPLAB, BACKBONE)

# Layout changes, one small function per case.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # [h, w, in, out] -> [out, in, h, w]
    "depthwise": lambda a: a.transpose(2, 3, 0, 1),  # [h, w, in, 1] -> [in, 1, h, w]
    "linear": lambda a: a.reshape(a.shape[-2:]).T,  # 1x1 conv [1, 1, in, out] -> Linear [out, in]
    "copy": lambda a: a,
}

# (TF scope, PyTorch module, weight variable, transform, model kinds). "{k}" runs over blocks 1..16
# and "{i}" is k - 1, transformers' index of that block.
LAYERS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("MobilenetV2/Conv", "mobilenet_v2.conv_stem.first_conv", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv/depthwise", "mobilenet_v2.conv_stem.conv_3x3", "depthwise_weights", "depthwise", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv/project", "mobilenet_v2.conv_stem.reduce_1x1", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv_{k}/expand", "mobilenet_v2.layer.{i}.expand_1x1", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv_{k}/depthwise", "mobilenet_v2.layer.{i}.conv_3x3", "depthwise_weights", "depthwise", BACKBONE_KINDS),
    ("MobilenetV2/expanded_conv_{k}/project", "mobilenet_v2.layer.{i}.reduce_1x1", "weights", "conv", BACKBONE_KINDS),
    ("MobilenetV2/Conv_1", "mobilenet_v2.conv_1x1", "weights", "conv", (CLASSIFICATION, BACKBONE)),
    ("image_pooling", "segmentation_head.conv_pool", "weights", "conv", (DEEPLAB,)),
    ("aspp0", "segmentation_head.conv_aspp", "weights", "conv", (DEEPLAB,)),
    ("concat_projection", "segmentation_head.conv_projection", "weights", "conv", (DEEPLAB,)),
)  # fmt: skip

# The variables of a conv + BatchNorm layer besides its weights: (TF suffix, PyTorch suffix).
LAYER_PARAMS = (
    ("BatchNorm/gamma", "normalization.weight"),
    ("BatchNorm/beta", "normalization.bias"),
    ("BatchNorm/moving_mean", "normalization.running_mean"),
    ("BatchNorm/moving_variance", "normalization.running_var"),
)
# Buffers with no TF counterpart, filled with a constant: (PyTorch suffix, value).
LAYER_CONSTANTS = (("normalization.num_batches_tracked", np.zeros((), dtype=np.int64)),)

# Classifiers: (TF variable, PyTorch tensor, transform, kind). Their class axis is axis 0 after the
# transform, which is where --drop-background removes the background class.
HEADS = (
    ("MobilenetV2/Logits/Conv2d_1c_1x1/weights", "classifier.weight", "linear", CLASSIFICATION),
    ("MobilenetV2/Logits/Conv2d_1c_1x1/biases", "classifier.bias", "copy", CLASSIFICATION),
    ("logits/semantic/weights", "segmentation_head.classifier.convolution.weight", "conv", DEEPLAB),
    ("logits/semantic/biases", "segmentation_head.classifier.convolution.bias", "copy", DEEPLAB),
)

# Slim endpoint -> (graph tensor, our module path, kinds). "{k}"/"{i}" as in LAYERS; "{n}" is k + 2.
ENDPOINTS = (
    ("layer_1", "MobilenetV2/Conv/Relu6:0", "mobilenet_v2.conv_stem.first_conv", BACKBONE_KINDS),
    ("layer_2", "MobilenetV2/expanded_conv/output:0", "mobilenet_v2.conv_stem", BACKBONE_KINDS),
    ("layer_{n}/expansion_output", "MobilenetV2/expanded_conv_{k}/expand/Relu6:0", "mobilenet_v2.layer.{i}.expand_1x1", BACKBONE_KINDS),
    ("layer_{n}", "MobilenetV2/expanded_conv_{k}/output:0", "mobilenet_v2.layer.{i}", BACKBONE_KINDS),
    ("layer_19", "MobilenetV2/Conv_1/Relu6:0", "mobilenet_v2.conv_1x1", (CLASSIFICATION, BACKBONE)),
    ("global_pool", "MobilenetV2/Logits/AvgPool:0", "mobilenet_v2 (pooling)", (CLASSIFICATION, BACKBONE)),
    ("logits", "MobilenetV2/Logits/output:0", "classifier", (CLASSIFICATION,)),
    ("image_pooling", "image_pooling/Relu:0", "segmentation_head.conv_pool", (DEEPLAB,)),
    ("aspp0", "aspp0/Relu:0", "segmentation_head.conv_aspp", (DEEPLAB,)),
    ("concat_projection", "concat_projection/Relu:0", "segmentation_head.conv_projection", (DEEPLAB,)),
    ("logits", "logits/semantic/BiasAdd:0", "segmentation_head.classifier", (DEEPLAB,)),
)  # fmt: skip


@dataclass(frozen=True)
class Rule:
    tf_name: str
    torch_name: str
    transform: str
    is_classifier: bool = False


def _expand(template: str) -> list[dict[str, int]]:
    """Substitutions for a template: every block if it names one, else none."""
    if "{k}" not in template:
        return [{}]
    return [{"k": k, "i": k - 1, "n": k + 2} for k in range(1, NUM_BLOCKS + 1)]


def conv_layers(kind: str) -> list[tuple[str, str, str, str]]:
    """(TF scope, PyTorch module, weight variable, transform) of every conv + BatchNorm layer."""
    return [
        (scope.format(**values), module_path(kind, module.format(**values)), weight, transform)
        for scope, module, weight, transform, kinds in LAYERS
        if kind in kinds
        for values in _expand(scope)
    ]


def module_path(kind: str, module: str) -> str:
    """`module` as the model class of `kind` names it (a backbone model has no `mobilenet_v2.` prefix)."""
    if not module.startswith(BACKBONE_MODULE_PREFIX):
        return module
    return MODEL_LAYOUTS[ARCHITECTURES[kind]][0] + module.removeprefix(BACKBONE_MODULE_PREFIX)


def rules_for(kind: str) -> list[Rule]:
    """The flat table for one model kind."""
    rules = []
    for tf_scope, torch_module, weight, transform in conv_layers(kind):
        rules.append(Rule(f"{tf_scope}/{weight}", f"{torch_module}.convolution.weight", transform))
        rules += [Rule(f"{tf_scope}/{tf}", f"{torch_module}.{pt}", "copy") for tf, pt in LAYER_PARAMS]
    rules += [Rule(tf, pt, transform, is_classifier=True) for tf, pt, transform, k in HEADS if k == kind]
    return rules


def constant_tensors(kind: str) -> dict[str, np.ndarray]:
    """Buffers the model has and TF does not (BatchNorm's batch counter)."""
    return {f"{module}.{suffix}": value for _, module, _, _ in conv_layers(kind) for suffix, value in LAYER_CONSTANTS}


def endpoints_for(kind: str) -> list[tuple[str, str, str]]:
    """(slim endpoint, graph tensor name, our module path) in network order."""
    rows = []
    for endpoint, tensor, module, kinds in ENDPOINTS:
        if kind in kinds:
            rows += [
                (endpoint.format(**v), tensor.format(**v), module_path(kind, module.format(**v)))
                for v in _expand(tensor)
            ]
    order = {"layer_1": 0, "layer_2": 1}
    return sorted(rows, key=lambda row: _endpoint_rank(row[0], order))


def _endpoint_rank(endpoint: str, fixed: dict[str, int]) -> tuple[int, int]:
    if endpoint in fixed:
        return fixed[endpoint], 0
    if endpoint.startswith("layer_"):
        number, _, rest = endpoint[len("layer_") :].partition("/")
        return int(number), 0 if rest else 1
    return 100, 0


def apply_rules(
    variables: Mapping[str, np.ndarray],
    kind: str,
    expected_shapes: Mapping[str, tuple[int, ...]],
    drop_background: bool = False,
) -> dict[str, np.ndarray]:
    """Map TF model variables to the PyTorch state dict, proving the correspondence is one to one."""
    rules = rules_for(kind)
    unmapped = sorted(set(variables) - {r.tf_name for r in rules})
    missing = sorted({r.tf_name for r in rules} - set(variables))
    if unmapped or missing:
        raise MappingError(_describe("checkpoint variables with no place in the model", unmapped)
                           + _describe("model variables missing from the checkpoint", missing)
                           + " Is this a MobileNetV2 slim or DeepLab checkpoint?")  # fmt: skip
    state = {}
    for rule in rules:
        array = TRANSFORMS[rule.transform](variables[rule.tf_name])
        if rule.is_classifier and drop_background:
            array = array[1:]
        state[rule.torch_name] = np.ascontiguousarray(array, dtype=np.float32)
    state.update(constant_tensors(kind))

    unfilled = sorted(set(expected_shapes) - set(state))
    extra = sorted(set(state) - set(expected_shapes))
    wrong = [f"{n} {state[n].shape} vs {tuple(expected_shapes[n])}" for n in sorted(state)
             if n in expected_shapes and tuple(state[n].shape) != tuple(expected_shapes[n])]  # fmt: skip
    if unfilled or extra or wrong:
        raise MappingError(_describe("model tensors not filled", unfilled)
                           + _describe("mapped tensors the model lacks", extra)
                           + _describe("shape mismatches", wrong))  # fmt: skip
    return state


def _describe(what: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
    return f"{len(items)} {what}: {shown}. "
