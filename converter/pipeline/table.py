"""THE table: which TF variable becomes which PyTorch tensor, and how its layout changes.

The rows themselves are the slim vocabulary (`converter.slim`: conv layers, BatchNorm variables, heads,
expanded by `rules_for`); `apply_rules` is the one loop that uses them, proving that every variable is
consumed and every tensor of the model filled. `ENDPOINTS` relates slim endpoint names to graph tensors and
module paths (for the verifier).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from converter.errors import MappingError
from converter.slim import BACKBONE_KINDS, TRANSFORMS, conv_layers, expand_blocks, module_path, rules_for
from converter.vocabulary import BACKBONE, CLASSIFICATION, DEEPLAB

# Buffers with no TF counterpart, filled with a constant: (PyTorch suffix, value).
LAYER_CONSTANTS = (("normalization.num_batches_tracked", np.zeros((), dtype=np.int64)),)

# Slim endpoint -> (graph tensor, our module path, kinds). "{k}"/"{i}" as in `converter.slim.LAYERS`; "{n}" is k + 2.
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
                for v in expand_blocks(tensor)
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


# --add-background: a background class at index 0 whose logit never wins (zero weights, this bias), so the
# other classes keep their logits and, after a softmax, their probabilities.
BACKGROUND_BIAS = -1.0e4
BACKGROUND_EDITS = ("drop", "add")


def edit_background(array: np.ndarray, edit: str | None) -> np.ndarray:
    """A classifier tensor (class axis first) with the background class dropped or added."""
    if edit == "drop":
        return array[1:]
    if edit == "add":
        row = np.full((1, *array.shape[1:]), 0.0 if array.ndim > 1 else BACKGROUND_BIAS, array.dtype)
        return np.concatenate([row, array])
    return array


def apply_rules(
    variables: Mapping[str, np.ndarray],
    kind: str,
    expected_shapes: Mapping[str, tuple[int, ...]],
    background: str | None = None,
    hidden_layers: int = 0,
) -> dict[str, np.ndarray]:
    """Map TF model variables to the PyTorch state dict, proving the correspondence is one to one;
    `background` ("drop" or "add") edits the classifier's background class; `hidden_layers` Dense layers
    precede the classifier."""
    rules = rules_for(kind, hidden_layers)
    unmapped = sorted(set(variables) - {r.tf_name for r in rules})
    missing = sorted({r.tf_name for r in rules} - set(variables))
    if unmapped or missing:
        raise MappingError(_describe("checkpoint variables with no place in the model", unmapped)
                           + _describe("model variables missing from the checkpoint", missing)
                           + " Is this a MobileNetV2 slim or DeepLab checkpoint?")  # fmt: skip
    state = {}
    for rule in rules:
        array = TRANSFORMS[rule.transform](variables[rule.tf_name])
        if rule.is_classifier:
            array = edit_background(array, background)
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
