"""The fake-quant ranges of a quantization-aware (tf.contrib.quantize) checkpoint, by our module names.

The rewriter's variables (set aside from the float model by `conventions`) hold, per quantization point,
a ``min`` and a ``max``: ``<layer scope>/weights_quant`` (the BatchNorm-folded kernel), ``<layer
scope>/act_quant`` (the layer's output) and ``<block scope>/post_activation_bypass_quant`` (a residual
add). They become `FAKE_QUANTIZATION_FILE`, read by `mobilenet_torch.fakequant`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np

from converter.slim import HEADS, conv_layers
from mobilenet_torch.quantized_files import FAKE_QUANTIZATION_FILE, FAKE_QUANTIZATION_FORMAT

BITS = 8
# Quantization point (the variables' scope, relative to a layer or block scope) -> (step suffix, role).
LAYER_POINTS = {"weights_quant": "weights", "act_quant": "output"}
BLOCK_POINTS = {"post_activation_bypass_quant": ("add", "output")}


def quantization_places(kind: str) -> dict[str, tuple[str, str]]:
    """Quantization prefix -> (step name, role) for every place the rewriter puts one."""
    layers = [(scope, module) for scope, module, _, _ in conv_layers(kind)]
    layers += [(tf.rpartition("/")[0], pt.rpartition(".")[0]) for tf, pt, _, k in HEADS if k == kind]
    places = {f"{scope}/{point}": (module, role) for scope, module in layers for point, role in LAYER_POINTS.items()}
    for scope, module in layers:
        if "/" in scope and "." in module:
            block, block_module = scope.rpartition("/")[0], module.rpartition(".")[0]
            for point, (suffix, role) in BLOCK_POINTS.items():
                places[f"{block}/{point}"] = (f"{block_module}.{suffix}", role)
    return places


def fake_quantization_files(
    names: Iterable[str], read: Callable[[str], np.ndarray], kind: str
) -> tuple[dict[str, bytes], list[str]]:
    """({FAKE_QUANTIZATION_FILE: content}, notes) from the quantization variables `names`; no file, and a
    note saying why, when some range has no place in the model."""
    ranges = {name.rpartition("/")[0] for name in names if name.endswith(("_quant/min", "_quant/max"))}
    if not ranges:
        return {}, []
    places = quantization_places(kind)
    unplaced = sorted(ranges - set(places))
    if unplaced:
        return {}, [
            f"{FAKE_QUANTIZATION_FILE} not written: {len(unplaced)} quantization ranges have no place in the "
            f"fake-quant model, e.g. {', '.join(unplaced[:3])}"
        ]
    steps: dict[str, dict[str, dict[str, float]]] = {}
    for prefix in sorted(ranges):
        step, role = places[prefix]
        low, high = (float(np.asarray(read(f"{prefix}/{end}"), dtype=np.float32)) for end in ("min", "max"))
        steps.setdefault(step, {})[role] = {"min": low, "max": high}
    content = {"format": FAKE_QUANTIZATION_FORMAT, "source": "tf.contrib.quantize", "bits": BITS, "steps": steps}
    return {FAKE_QUANTIZATION_FILE: (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()}, []
