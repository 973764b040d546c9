"""TFLite files written by the current TensorFlow converter from a fixture checkpoint's graph
(fixtures.tflite_builder): int8 per-channel full-integer quantization, and float32.

- The integer model reproduces the interpreter's reference kernels at every step, and its softmax;
  for DeepLab (output stride 8: dilated depthwise convs come as space-to-batch convs with their
  BatchNorm unfolded, the image pooling as a MEAN) every step and the label map.
- The dequantized float model of an int8 file keeps the interpreter's top-1 / >= 97% of its labels.
- A float .tflite converts to logits within 1e-4 x max|logit| of the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.formats.tflite import TFLiteReader
from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation
from mobilenet_torch.quantized import QuantizedMobileNetV2
from mobilenet_torch.quantized_files import QUANTIZATION_FILE
from tests.helpers import logit_tolerance, random_images, to_torch
from tests.realdata_tflite import interpreter

tf = pytest.importorskip("tensorflow", reason="TensorFlow builds the TFLite fixtures and runs the interpreter")

VARIANT = "mobilenet_v2_0.35_96"
SIZE = 96
DEEPLAB_VARIANT = "deeplabv3_mnv2_dm05_pascal_trainaug"
DEEPLAB_SIZE = 97  # odd, as DeepLab crops are; small to keep the test fast
IMAGES = 4  # seeded images, none of them the calibration set
WITHIN_ONE_STEP = 0.99


@pytest.fixture(scope="module")
def tflite_file():
    """The int8 classifier."""
    from fixtures.tflite_builder import build_tflite

    return build_tflite(VARIANT, "int8")


def invoke(interp, images: np.ndarray) -> np.ndarray:
    interp.set_tensor(interp.get_input_details()[0]["index"], images)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


def worst_step_error(model: QuantizedMobileNetV2, interp, images: np.ndarray) -> int:
    """The largest difference, in quantization steps, between any of our steps and the interpreter's."""
    steps = model.run(to_torch(images))
    worst = 0
    for name, record in model.records.items():
        if name in steps:
            reference = interp.get_tensor(record["tensor"]).astype(np.int64)
            ours = steps[name].values.numpy()
            ours = (ours.transpose(0, 2, 3, 1) if ours.ndim == 4 else ours).reshape(reference.shape)
            worst = max(worst, int(np.abs(ours - reference).max()))
    return worst


def test_int8_file_is_what_the_current_converter_writes(tflite_file):
    reader = TFLiteReader(tflite_file)
    weights = reader.model.tensors[reader.steps[1].op.inputs[1]]
    assert reader.steps[0].name == "input" and reader.steps[0].op.op == "QUANTIZE"
    assert weights.dtype == "int8" and len(weights.quantization.scale) == weights.shape[0] > 1
    assert not weights.quantization.zero_point.any()  # symmetric
    assert reader.steps[-1].op.op == "DEQUANTIZE"


def test_int8_integer_model_reproduces_the_interpreter(tflite_file, tmp_path):
    folder = tmp_path / "int8"
    convert_checkpoint(tflite_file, folder)
    model = QuantizedMobileNetV2.from_pretrained(folder)
    assert model.dtype == "int8"
    interp = interpreter(tflite_file, preserve_all_tensors=True, reference_kernels=True)
    float_model = model.float_twin()
    float_agrees = 0
    for seed in range(IMAGES):
        images = random_images((SIZE, SIZE), seed=100 + seed)
        theirs = invoke(interp, images)[0]
        worst = worst_step_error(model, interp, images)
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


@pytest.mark.parametrize(
    ("variant", "size", "head"),
    [(VARIANT, SIZE, "classifier"), (DEEPLAB_VARIANT, DEEPLAB_SIZE, "segmentation_head.classifier")],
    ids=["classification", "deeplab"],
)
def test_float_tflite_converts_to_the_interpreter_logits(tmp_path, variant, size, head):
    from fixtures.tflite_builder import build_tflite

    path = build_tflite(variant, "float", size)
    folder = tmp_path / "float"
    convert_checkpoint(path, folder)
    assert not (folder / QUANTIZATION_FILE).exists()
    cls = MobileNetV2ForImageClassification if head == "classifier" else MobileNetV2ForSemanticSegmentation
    model = cls.from_pretrained(folder)
    logits_tensor = next(step.op.outputs[0] for step in TFLiteReader(path).steps if step.name == head)
    interp = interpreter(path, preserve_all_tensors=True)
    for seed in range(2):
        images = random_images((size, size), seed=200 + seed)
        invoke(interp, images)
        theirs = interp.get_tensor(logits_tensor)
        with torch.no_grad():
            ours = model(to_torch(images)).logits.numpy()
        ours = ours.transpose(0, 2, 3, 1) if ours.ndim == 4 else ours.reshape(theirs.shape)
        error = float(np.abs(ours - theirs).max())
        print(f"\n{variant} float seed {seed}: max |logit difference| {error:.2e}, bar {logit_tolerance(theirs):.2e}")
        assert error <= logit_tolerance(theirs)


def test_int8_deeplab_reproduces_the_interpreter(tmp_path):
    from fixtures.tflite_builder import build_tflite

    path = build_tflite(DEEPLAB_VARIANT, "int8", DEEPLAB_SIZE)
    folder = tmp_path / "deeplab"
    summary = convert_checkpoint(path, folder)
    assert (summary.variant.kind, summary.variant.output_stride, summary.variant.size) == ("deeplab", 8, DEEPLAB_SIZE)
    model = QuantizedMobileNetV2.from_pretrained(folder)
    assert "mobilenet_v2.layer.6.conv_3x3.mul" in model.records  # the unfolded BatchNorm of a dilated conv
    interp = interpreter(path, preserve_all_tensors=True, reference_kernels=True)
    images = random_images((DEEPLAB_SIZE, DEEPLAB_SIZE), seed=300)
    theirs = invoke(interp, images)[0]
    worst = worst_step_error(model, interp, images)
    labels = model(to_torch(images)).labels[0].numpy()
    equal = float((labels == theirs).mean())
    # The int8 activations of a random-weight model move ~6% of its labels away from any float model's
    # (the checkpoint's own float model agrees no better), so the dequantized model is held to that.
    original = MobileNetV2ForSemanticSegmentation.from_pretrained(_float_checkpoint_folder(tmp_path))
    float_agreement, original_agreement = (
        float((m.predict_labels(to_torch(images))[0].numpy() == theirs).mean()) for m in (model.float_twin(), original)
    )
    print(
        f"\nint8 DeepLab: worst step error {worst}, labels equal {equal:.2%}; float labels agree with TFLite: "
        f"dequantized {float_agreement:.2%}, the checkpoint's float model {original_agreement:.2%}"
    )
    assert worst <= 1 and equal >= 0.995
    assert float_agreement >= original_agreement - 0.01


def _float_checkpoint_folder(tmp_path):
    """The fixture checkpoint the int8 file was converted from, converted as a float model."""
    from fixtures.cache import ensure_fixture

    folder = tmp_path / "checkpoint"
    prefix = ensure_fixture(DEEPLAB_VARIANT).checkpoint_prefix
    convert_checkpoint(prefix, folder, output_stride=8, size=DEEPLAB_SIZE, weights="raw")
    return folder
