"""TFLite files written by the current TensorFlow converter from a fixture checkpoint's graph
(fixtures.tflite_builder): int8 per-channel full-integer quantization, float32, float16 and
dynamic-range quantization.

- The integer model reproduces the interpreter's reference kernels at every step, and its softmax;
  for DeepLab (output stride 8: dilated depthwise convs come as space-to-batch convs with their
  BatchNorm unfolded, the image pooling as a MEAN) every step and the label map.
- The dequantized float model of an int8 file keeps the interpreter's top-1 / >= 97% of its labels.
- A float32 or float16 .tflite converts to logits within 1e-4 x max|logit| of the interpreter.
- A dynamic-range .tflite converts to the float model of its dequantized weights, which lands where the
  interpreter's on-the-fly activation quantization puts it (see `test_dynamic_range_tflite_...`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.formats.tflite import TFLiteReader
from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation
from mobilenet_torch.quantized import QuantizedMobileNetV2
from mobilenet_torch.quantized_files import QUANTIZATION_FILE
from tests.helpers import SMALL, logit_tolerance, random_images, to_torch
from tests.realdata_tflite import interpreter

tf = pytest.importorskip("tensorflow", reason="TensorFlow builds the TFLite fixtures and runs the interpreter")

SIZE = 96
DEEPLAB_VARIANT = "deeplabv3_mnv2_dm05_pascal_trainaug"
DEEPLAB_SIZE = 97  # odd, as DeepLab crops are; small to keep the test fast
IMAGES = 4  # seeded images, none of them the calibration set
WITHIN_ONE_STEP = 0.99
# The hybrid kernels of a dynamic-range model quantize each conv's float input to int8 on the fly (about
# 1/255 of its range), which the float model does not; over the 50-odd convs this was measured at 1.5-3.1%
# of max|logit| for the classifiers (the seeds here; 2.3% and 3.1% at worst over 20 and 10 seeds) and
# 4.1-4.8% for DeepLab. The bar is twice the worst of those; misreading the per-channel scales as one per
# tensor lands at ~300%.
DYNAMIC_LOGIT_BAR = 0.1


@pytest.fixture(scope="module")
def tflite_file():
    """The int8 classifier."""
    from fixtures.tflite_builder import build_tflite

    return build_tflite(SMALL, "int8")


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


def convert_float(path, folder):
    """`path` converted into `folder` as a float32 model (no integer files): (model, its logits tensor in
    the .tflite graph, the notes of its conversion.json)."""
    from safetensors.numpy import load_file

    convert_checkpoint(path, folder)
    assert not (folder / QUANTIZATION_FILE).exists()
    weights = load_file(folder / "model.safetensors")
    assert {str(v.dtype) for k, v in weights.items() if not k.endswith("num_batches_tracked")} == {"float32"}
    reader = TFLiteReader(path)
    classification = reader.kind == "classification"
    cls = MobileNetV2ForImageClassification if classification else MobileNetV2ForSemanticSegmentation
    head = "classifier" if classification else "segmentation_head.classifier"
    logits_tensor = next(step.op.outputs[0] for step in reader.steps if step.name == head)
    notes = json.loads((folder / "conversion.json").read_text())["notes"]
    return cls.from_pretrained(folder), logits_tensor, notes


def logits_of(model, images: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The model's logits in the interpreter's layout (NHWC for DeepLab)."""
    with torch.no_grad():
        ours = model(to_torch(images)).logits.numpy()
    return ours.transpose(0, 2, 3, 1) if ours.ndim == 4 else ours.reshape(like.shape)


@pytest.mark.parametrize("mode", ["float", "float16"])
@pytest.mark.parametrize(
    ("variant", "size"), [(SMALL, SIZE), (DEEPLAB_VARIANT, DEEPLAB_SIZE)], ids=["classification", "deeplab"]
)
def test_float_tflite_converts_to_the_interpreter_logits(tmp_path, variant, size, mode):
    """The interpreter widens float16 weights to float32 before its float kernels, so a float16 file
    is held to the float bar too (measured: ~1e-6 x max|logit| for the classifier)."""
    from fixtures.tflite_builder import build_tflite

    path = build_tflite(variant, mode, size)
    model, logits_tensor, notes = convert_float(path, tmp_path / mode)
    if mode == "float16":
        assert "float16 weights, float32 activations" in notes[0]
        assert "the source is a float16 model; the converted model is float32" in notes[1]
        reader = TFLiteReader(path)
        assert not reader.quantized and not reader.hybrid
        weight = reader.steps[0].op.inputs[1]  # a conv reads its weights from a DEQUANTIZE of float16
        dequantize = next(op for op in reader.model.operators if op.outputs[0] == weight)
        assert dequantize.op == "DEQUANTIZE" and reader.model.tensors[dequantize.inputs[0]].dtype == "float16"
    interp = interpreter(path, preserve_all_tensors=True)
    for seed in range(2):
        images = random_images((size, size), seed=200 + seed)
        invoke(interp, images)
        theirs = interp.get_tensor(logits_tensor)
        error = float(np.abs(logits_of(model, images, theirs) - theirs).max())
        print(f"\n{variant} {mode} seed {seed}: max |logit difference| {error:.2e}, bar {logit_tolerance(theirs):.2e}")
        assert error <= logit_tolerance(theirs)


@pytest.mark.parametrize(
    ("variant", "size"),
    [(SMALL, SIZE), ("mobilenet_v2_1.3_224", SIZE), (DEEPLAB_VARIANT, DEEPLAB_SIZE)],
    ids=["classification", "classification-int8-stem", "deeplab"],
)
def test_dynamic_range_tflite_converts_to_its_dequantized_float_model(tmp_path, variant, size):
    """Depth 1.3 has a stem conv of over 1024 weights, which the converter quantizes too."""
    from fixtures.tflite_builder import build_tflite

    path = build_tflite(variant, "dynamic", size)
    reader = TFLiteReader(path)
    assert not reader.quantized and reader.hybrid
    stem = reader.model.tensors[reader.steps[0].op.inputs[1]]
    assert stem.dtype == ("int8" if variant == "mobilenet_v2_1.3_224" else "float32")
    conv = next(step.op for step in reader.steps if step.name == "mobilenet_v2.layer.15.expand_1x1")
    weight = reader.model.tensors[conv.inputs[1]]
    assert weight.dtype == "int8" and len(weight.quantization.scale) == weight.shape[0] > 1  # per channel
    assert not weight.quantization.zero_point.any()  # symmetric
    model, logits_tensor, notes = convert_float(path, tmp_path / "dynamic")
    assert "dynamic range: int8 weights" in notes[0]
    assert "the source is a dynamic-range quantized model; the converted model is float32" in notes[1]
    # The float file the dynamic one was quantized from: its weights before the int8 rounding.
    source, _, _ = convert_float(build_tflite(variant, "float", size), tmp_path / "float")
    interp = interpreter(path, preserve_all_tensors=True, reference_kernels=True)
    errors, source_errors, agreements = [], [], []
    for seed in range(IMAGES):
        images = random_images((size, size), seed=200 + seed)
        invoke(interp, images)
        theirs = interp.get_tensor(logits_tensor)
        ours, original = logits_of(model, images, theirs), logits_of(source, images, theirs)
        scale = max(1.0, float(np.abs(theirs).max()))
        errors.append(float(np.abs(ours - theirs).max()) / scale)
        source_errors.append(float(np.abs(original - theirs).max()) / scale)
        agreement, source_agreement = (float((x.argmax(-1) == theirs.argmax(-1)).mean()) for x in (ours, original))
        print(
            f"\n{variant} dynamic seed {seed}: max |logit difference| {errors[-1]:.2e} x max|logit| (the float "
            f"source: {source_errors[-1]:.2e}); argmax agreement {agreement:.2%} (the float source: "
            f"{source_agreement:.2%})"
        )
        assert errors[-1] <= DYNAMIC_LOGIT_BAR
        agreements.append((agreement, source_agreement))
    if reader.kind == "classification":
        assert all(agreement == 1.0 for agreement, _ in agreements)
    else:  # a random-weight DeepLab's label margins are ~0.1% of max|logit|: some pixels flip either way
        ours, theirs = np.mean(agreements, axis=0)
        assert ours >= theirs - 0.01
    # The interpreter computes with the dequantized weights, so they land closer than the unrounded ones.
    assert np.mean(errors) < np.mean(source_errors)


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
    # (the checkpoint's own float model agrees no better), so the dequantized model is held to that; the
    # issue's 97% bar is held on real weights (tests/test_tflite.py, the ``_int8`` models).
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
