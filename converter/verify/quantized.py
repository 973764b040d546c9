"""Comparison against a quantized ``.tflite``: an integer model that the float model does not equal end to
end. Each conv of the float model is compared on the interpreter's own input of that layer (`float/<module>`
rows, the head's as `logits`) and each step of the integer emulation with the interpreter's
(`integer/<step>` rows), both within one output quantization step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from converter.verify.inputs import InputCase
from converter.verify.rows import FLOAT_STEP, INTEGER_STEP, LOGITS, Row, compare_arrays, to_nhwc, without_background
from mobilenet_torch.architecture import HIDDEN_CLASSIFIER

#: One output step, plus the float32 rounding of a real value near a step boundary.
STEP_SLACK = 1.0 + 1e-4


def quantized_endpoints(endpoints, reference, model_dir: Path, notes: list[str]):
    """The endpoints compared against a quantized `.tflite`: the slim ones (not compared, with the
    reason, but the logits), every conv of the float model in network order (the head's under the
    name `logits`), then every step of the integer emulation where the folder carries it; and the
    emulation (None where the folder has none)."""
    from mobilenet_torch.errors import ModelFolderError as EmulationError
    from mobilenet_torch.quantized import QuantizedMobileNetV2

    logits_module = next(module for endpoint, _, module in endpoints if endpoint == LOGITS)
    slim = [row for row in endpoints if row[0] != LOGITS]
    tensor_names = {detail["index"]: detail["name"] for detail in reference.interpreter.get_tensor_details()}
    layers = []
    for step in _layer_steps(reference):
        name = LOGITS if step.name == logits_module else FLOAT_STEP + step.name
        layers.append((name, tensor_names[step.output_tensor], step.name))
    try:
        emulator = QuantizedMobileNetV2.from_pretrained(model_dir)
    except EmulationError as error:
        notes.append(f"the integer model was not compared: {error}")
        return slim + layers, None
    steps = [
        (INTEGER_STEP + name, tensor_names[record["tensor"]], name)
        for name, record in emulator.records.items()
        if record.get("output")
    ]
    notes.append(
        "quantized reference: each conv of the float (dequantized) model is run on the interpreter's own "
        "input of that layer, clamped to the range its output type holds, and compared with the interpreter's "
        "output, within one output quantization step: "
        "the integer kernel computes the same sum exactly and rounds it once to its output step (half a "
        "step) after a fixed-point multiply; end to end the float model is not the integer model (their "
        "difference accumulates over the layers, ~10 steps at the logits of a real model), so it is not "
        "compared end to end. The integer emulation (mobilenet_torch.quantized) is compared step by step, "
        "within one output step of the interpreter"
    )
    return slim + layers + steps, emulator


def _layer_steps(reference):
    """The conv steps whose output is the output of one layer of our float model on the op's input:
    not those behind a space-to-batch (their op runs on a reshuffled input) nor those whose BatchNorm
    the converter left as separate ops."""
    names = {step.name for step in reference.steps}
    return [
        step
        for step in reference.steps
        if step.scope is not None and step.output_tensor == step.op.outputs[0] and f"{step.name}.mul" not in names
    ]


def compare_quantized(model, emulator, reference, case: InputCase, endpoints, drop_background: bool) -> list[Row]:
    """Rows of the float layers and the integer steps on one input (one image at a time: the
    interpreter's batch is 1); every tolerance is one output quantization step."""
    import torch

    layers = {module: endpoint for endpoint, _, module in endpoints if endpoint.startswith(FLOAT_STEP)}
    layers.update({module: endpoint for endpoint, _, module in endpoints if endpoint == LOGITS})
    found: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for image in case.pixels:
        reference.invoke(np.ascontiguousarray(image[None].transpose(0, 2, 3, 1)))
        with torch.inference_mode():
            for step in _layer_steps(reference):
                layer_input = _nchw(reference.real(step.op.inputs[0]))
                ours = _float_layer(model, step.name)(layer_input)
                # The kernel saturates to what its integer type holds (a projection has no other clamp).
                ours = np.clip(to_nhwc(ours.numpy()), *reference.representable(step.output_tensor))
                theirs = without_background(reference.real(step.output_tensor), ours.shape, drop_background)
                theirs = theirs.reshape(ours.shape)
                scale = reference.quantization(step.output_tensor)[0]
                found.setdefault(layers[step.name], []).append((ours, theirs, scale))
            if emulator is not None:
                integers = emulator.run(torch.from_numpy(image[None]))
                for name, record in emulator.records.items():
                    if name not in integers:  # a step it does not compute (a reshape): nothing to compare
                        continue
                    q = integers[name]
                    ours = to_nhwc(q.values.numpy()).astype(np.float64)
                    theirs = reference.integers(record["tensor"]).astype(np.float64)
                    theirs = without_background(theirs, ours.shape, drop_background).reshape(ours.shape)
                    step = (ours - q.zero_point) * q.scale, (theirs - q.zero_point) * q.scale, q.scale
                    found.setdefault(INTEGER_STEP + name, []).append(step)
    rows = []
    for endpoint, tensor, module in endpoints:
        if endpoint not in found:
            continue
        ours = np.concatenate([part[0] for part in found[endpoint]])
        theirs = np.concatenate([part[1] for part in found[endpoint]])
        scale = found[endpoint][0][2]
        result = {**compare_arrays(ours, ours, theirs, atol=scale * STEP_SLACK, rtol=0.0), "float64_distance": math.nan}
        rows.append(Row(case.name, endpoint, module, tensor, list(theirs.shape), **result))
    return rows


def _float_layer(model, name: str):
    """The float model's layer of a conv step as a function of its NCHW input: a ConvLayer, or a Linear of the
    head on the flattened input, followed by the activation that a hidden Dense layer keeps as a module of
    its own (`classifier_activations`)."""
    import torch

    layer = model.get_submodule(name)
    if not isinstance(layer, torch.nn.Linear):
        return layer
    prefix, _, index = name.rpartition(".")
    activation = model.classifier_activations[int(index)] if prefix == HIDDEN_CLASSIFIER else torch.nn.Identity()
    return lambda x: activation(layer(x.flatten(1)))


def _nchw(values: np.ndarray):
    """An op's NHWC input as NCHW, or a head's [N, C] input (after a MEAN without keep_dims) as [N, C, 1, 1]."""
    import torch

    values = values[:, :, None, None] if values.ndim == 2 else values.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(values))
