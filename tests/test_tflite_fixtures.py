"""TFLite files written by the current TensorFlow converter from a fixture checkpoint's graph
(fixtures.tflite_builder): int8 per-channel full-integer quantization, and float32.

- The integer model reproduces the interpreter's reference kernels at every step, and its softmax.
- The dequantized float model of the int8 file keeps the interpreter's top-1.
- A float .tflite converts to logits within 1e-4 x max|logit| of the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.formats.tflite import TFLiteReader
from mobilenet_torch import MobileNetV2ForImageClassification
from mobilenet_torch.quantized import QuantizedMobileNetV2
from mobilenet_torch.quantized_files import QUANTIZATION_FILE
from tests.helpers import logit_tolerance, random_images, to_torch
from tests.realdata_tflite import interpreter

tf = pytest.importorskip("tensorflow", reason="TensorFlow builds the TFLite fixtures and runs the interpreter")

VARIANT = "mobilenet_v2_0.35_96"
SIZE = 96
IMAGES = 4  # seeded images, none of them the calibration set
WITHIN_ONE_STEP = 0.99


@pytest.fixture(scope="module")
def tflite_file():
    from fixtures.tflite_builder import build_tflite

    return {mode: build_tflite(VARIANT, mode) for mode in ("int8", "float")}


def invoke(interp, images: np.ndarray) -> np.ndarray:
    interp.set_tensor(interp.get_input_details()[0]["index"], images)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


def test_int8_file_is_what_the_current_converter_writes(tflite_file):
    reader = TFLiteReader(tflite_file["int8"])
    weights = reader.model.tensors[reader.steps[1].op.inputs[1]]
    assert reader.steps[0].name == "input" and reader.steps[0].op.op == "QUANTIZE"
    assert weights.dtype == "int8" and len(weights.quantization.scale) == weights.shape[0] > 1
    assert not weights.quantization.zero_point.any()  # symmetric
    assert reader.steps[-1].op.op == "DEQUANTIZE"


def test_int8_integer_model_reproduces_the_interpreter(tflite_file, tmp_path):
    folder = tmp_path / "int8"
    convert_checkpoint(tflite_file["int8"], folder)
    model = QuantizedMobileNetV2.from_pretrained(folder)
    assert model.dtype == "int8"
    interp = interpreter(tflite_file["int8"], preserve_all_tensors=True, reference_kernels=True)
    float_model = model.float_twin()
    float_agrees = 0
    for seed in range(IMAGES):
        images = random_images((SIZE, SIZE), seed=100 + seed)
        theirs = invoke(interp, images)[0]
        steps = model.run(to_torch(images))
        worst = 0
        for name, record in model.records.items():
            if name in steps:
                reference = interp.get_tensor(record["tensor"]).astype(np.int64)
                ours = steps[name].values.numpy()
                ours = (ours.transpose(0, 2, 3, 1) if ours.ndim == 4 else ours).reshape(reference.shape)
                worst = max(worst, int(np.abs(ours - reference).max()))
        probabilities = model(to_torch(images)).probabilities[0].numpy()
        step = model.records["softmax"]["output"]["scale"]
        within = float((np.abs(probabilities - theirs) <= step + 1e-7).mean())
        print(f"\nseed {seed}: worst step error {worst}, softmax within one step {within:.2%}")
        assert worst <= 1 and within >= WITHIN_ONE_STEP
        assert theirs[probabilities.argmax()] == theirs.max()
        with torch.no_grad():
            float_logits = float_model(to_torch(images)).logits[0].numpy()
        float_agrees += bool(theirs[float_logits.argmax()] == theirs.max())
    print(f"dequantized float model: top-1 of the interpreter on {float_agrees}/{IMAGES} images")
    assert float_agrees == IMAGES


def test_float_tflite_converts_to_the_interpreter_logits(tflite_file, tmp_path):
    folder = tmp_path / "float"
    convert_checkpoint(tflite_file["float"], folder)
    assert not (folder / QUANTIZATION_FILE).exists()
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    steps = TFLiteReader(tflite_file["float"]).steps
    logits_tensor = next(step.op.outputs[0] for step in steps if step.name == "classifier")
    interp = interpreter(tflite_file["float"], preserve_all_tensors=True)
    for seed in range(2):
        images = random_images((SIZE, SIZE), seed=200 + seed)
        invoke(interp, images)
        theirs = interp.get_tensor(logits_tensor).reshape(1, -1)
        with torch.no_grad():
            ours = model(to_torch(images)).logits.numpy()
        error = float(np.abs(ours - theirs).max())
        print(f"\nfloat .tflite seed {seed}: max |logit difference| {error:.2e} (bar {logit_tolerance(theirs):.2e})")
        assert error <= logit_tolerance(theirs)
