"""The TFLite reader and the integer model, against the TFLite interpreter on Google's real quantized
models and real images (../shared/realdata).

- The native flatbuffer parser reads every op, tensor shape, type and quantization the interpreter
  reports.
- `convert_checkpoint` on a .tflite writes a float (dequantized) folder that keeps the interpreter's
  top-1 on the classification images and >= 97% of its DeepLab label map, in mobilenet_torch and in
  transformers. The interpreter runs its reference kernels, the specification of its integer arithmetic:
  the default ones (XNNPACK) are not bit-exact with them, and on the int8 depth 0.5 DeepLab they move ~20%
  of the dog image's labels (measured in `test_integer_deeplab_reproduces_the_label_map`).
- `QuantizedMobileNetV2` on the same folder reproduces the interpreter's reference kernels step by
  step: every intermediate tensor, in quantization steps of that tensor.
- The same bars hold for int8 per-channel full-integer models that the current TF converter makes from
  the same real weights (``<model>_int8``: fixtures.tflite_builder.build_int8_from_tflite, calibrated on
  these images and augmented crops of them; int8 input and output, DeepLab's labels int32), except the
  float DeepLab's label map: how the converter writes the dilated convs differs between machines, and
  with it how far the file's int8 activations move the labels, so the float model is held to the float
  model the file stands for instead (its form and its agreement with the int8 interpreter are printed).
  ``tests/test_tflite_forms.py`` covers every form, whatever the local converter writes.
Run with `pytest -s` to see the measured agreements.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from converter import convert_checkpoint
from converter.errors import ConverterError, TFLiteFormatError
from converter.formats.sniffing import is_tflite_file
from converter.formats.tflite import TFLiteReader
from converter.formats.tflite_schema import BUILTIN_OPERATORS, parse_model
from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation
from mobilenet_torch.quantized import QTensor, QuantizedMobileNetV2
from mobilenet_torch.quantized_files import QUANTIZATION_FILE
from tests.helpers import logit_tolerance
from tests.realdata_tflite import IMAGES, MODELS, REALDATA, interpreter, pixel_values, quantized_image, scope_of

if not REALDATA.is_dir():
    pytest.skip(f"{REALDATA} is absent: no real TFLite models to check against", allow_module_level=True)
tf = pytest.importorskip("tensorflow", reason="TensorFlow (tf.lite) is needed to run the real TFLite models")
pytest.importorskip("PIL", reason="pillow is needed to read the real images")

IMAGENET = "mobilenet_v2_1.0_224_quant"
INAT = "mobilenet_v2_1.0_224_inat_bird_quant"
DEEPLAB = "deeplabv3_mnv2_pascal_quant"
DEEPLAB_DM05 = "deeplabv3_mnv2_dm05_pascal_quant"
CLASSIFICATION_IMAGES = ("cat", "bird", "grace_hopper", "dragonfly", "missvickie_potato_chips")
SEGMENTATION_IMAGES = ("bird_segmentation", "dog_segmentation")
INT8 = "_int8"  # suffix: the current converter's int8 per-channel model of the real model's weights
IMAGENET_INT8, DEEPLAB_INT8, DEEPLAB_DM05_INT8 = (name + INT8 for name in (IMAGENET, DEEPLAB, DEEPLAB_DM05))
REAL = (IMAGENET, INAT, DEEPLAB, DEEPLAB_DM05)
REBUILT = (IMAGENET_INT8, DEEPLAB_INT8, DEEPLAB_DM05_INT8)
# The rebuilt models' biases against the real ones, as a share of max |bias|: the int32 biases round to
# input scale x weight scale, and the BatchNorm the converter leaves unfolded after a space-to-batch conv
# (DeepLab's dilated blocks) adds its own int8 constant; measured at 0.05% (classifier), 0.38% (DeepLab, the
# MUL + ADD form).
REBUILT_BIAS_ERROR = 0.01
WITHIN_ONE_STEP = 0.99  # the bar for the integer model's outputs
LABELS_EQUAL = 0.995  # ... and for its DeepLab label map
FLOAT_PIXEL_AGREEMENT = 0.97  # the dequantized float model's label map


def tflite_path(name: str):
    """A real model's file, or the int8 model rebuilt from its weights (built once, then cached)."""
    if not name.endswith(INT8):
        return MODELS / f"{name}.tflite"
    from fixtures.tflite_builder import build_int8_from_tflite

    calibration = [IMAGES / f"{image}.bmp" for image in CLASSIFICATION_IMAGES + SEGMENTATION_IMAGES]
    return build_int8_from_tflite(MODELS / f"{name.removesuffix(INT8)}.tflite", calibration)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def converted_once(tmp_path_factory):
    """model name -> its converted folder, each converted once."""
    folders = {}

    def convert(name: str):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name) / "out"
            convert_checkpoint(tflite_path(name), folders[name])
        return folders[name]

    return convert


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return converted_once(tmp_path_factory)


def float_truth(folder, path, float_path, quantized: np.ndarray) -> tuple[float, float, float]:
    """The converted float model of a quantized DeepLab against the float model the file stands for (every
    constant dequantized, activations float32: ``tests.tflite_editing.dequantized_copy``) run by the
    interpreter: max |logit difference|, its tolerance (the project's parity bar) and the share of equal labels."""
    from tests.tflite_editing import dequantized_copy

    interp = interpreter(dequantized_copy(path, float_path), preserve_all_tensors=True)
    detail = interp.get_input_details()[0]
    interp.set_tensor(detail["index"], pixel_values(quantized).numpy().transpose(0, 2, 3, 1).copy())
    interp.invoke()
    logits_tensor = json.loads((folder / QUANTIZATION_FILE).read_text())["steps"]["segmentation_head.classifier"]
    theirs = interp.get_tensor(logits_tensor["tensor"]).transpose(0, 3, 1, 2)
    theirs_labels = interp.get_tensor(interp.get_output_details()[0]["index"])[0]
    model = MobileNetV2ForSemanticSegmentation.from_pretrained(folder)
    with torch.no_grad():
        ours = model(pixel_values(quantized)).logits.numpy()
    ours_labels = model.predict_labels(pixel_values(quantized))[0].numpy()
    error = float(np.abs(ours - theirs).max())
    return error, logit_tolerance(theirs), float((ours_labels == theirs_labels).mean())


def invoke(interp, quantized: np.ndarray) -> np.ndarray:
    """The output for a uint8 image, fed as its real value (q - 128) / 128 in the model's own input
    quantization (the real models': q itself; the int8 models': q - 128)."""
    detail = interp.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    limits = np.iinfo(detail["dtype"])
    values = np.round((quantized.astype(np.float64) - 128) / 128 / scale) + zero_point
    interp.set_tensor(detail["index"], np.clip(values, limits.min, limits.max).astype(detail["dtype"]))
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


def parser_name(op: str) -> str:
    """The parser's name for an op the interpreter calls `op`: the same, or ``BUILTIN_<code>`` for one it
    leaves unnamed (the SHAPE op of the current converter's classifier), numbered by TensorFlow's schema."""
    from tensorflow.lite.python.schema_py_generated import BuiltinOperator

    return op if op in BUILTIN_OPERATORS.values() else f"BUILTIN_{getattr(BuiltinOperator, op)}"


@pytest.mark.parametrize("name", REAL + REBUILT)
def test_parser_reads_what_the_interpreter_reads(name):
    path = tflite_path(name)
    model = parse_model(path.read_bytes())
    interp = interpreter(path, reference_kernels=True)  # no delegate replacing the ops
    ops = interp._get_ops_details()
    assert [op.op for op in model.operators] == [parser_name(op["op_name"]) for op in ops]
    assert [list(op.inputs) for op in model.operators] == [list(op["inputs"]) for op in ops]
    assert [list(op.outputs) for op in model.operators] == [list(op["outputs"]) for op in ops]
    for detail in interp.get_tensor_details():
        tensor = model.tensors[detail["index"]]
        assert tensor.name == detail["name"]
        # The interpreter gives a tensor of dynamic batch (signature -1: the space-to-batch convs of the int8
        # DeepLab) its runtime shape; the file stores batch 1 there.
        signature = tuple(detail["shape_signature"])
        runtime = tuple(int(d) if s != -1 else 1 for d, s in zip(detail["shape"], signature, strict=True))
        assert tensor.shape == runtime
        assert np.dtype(tensor.dtype) == detail["dtype"]
        params = detail["quantization_parameters"]
        if tensor.quantization is None:
            assert len(params["scales"]) == 0
        else:
            np.testing.assert_array_equal(tensor.quantization.scale, params["scales"])
            np.testing.assert_array_equal(tensor.quantization.zero_point, params["zero_points"])
        values = model.data(tensor)
        if values is not None:
            np.testing.assert_array_equal(values, interp.get_tensor(detail["index"]))


def test_damaged_files_are_refused(tmp_path):
    data = (MODELS / f"{IMAGENET}.tflite").read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(data[: len(data) // 3])
    assert is_tflite_file(truncated)
    with pytest.raises(TFLiteFormatError):
        TFLiteReader(truncated)
    # Seeded corruption of the flatbuffer's tables and of its end: refused as a converter error or read,
    # never an IndexError or the like.
    rng = np.random.default_rng(0)
    damaged = tmp_path / "damaged.tflite"
    for trial in range(120):
        mutated = bytearray(data)
        region = (0, 200_000) if trial % 2 else (len(data) - 200_000, len(data))
        for position in rng.integers(*region, size=int(rng.integers(1, 9))):
            mutated[position] = int(rng.integers(256))
        cut = len(mutated) if trial % 3 else int(rng.integers(8, len(mutated)))
        damaged.write_bytes(bytes(mutated[:cut]))
        try:
            TFLiteReader(damaged)
        except ConverterError:
            pass
    other = tmp_path / "not_a_model.tflite"
    other.write_bytes(b"\x00" * 64)
    assert not is_tflite_file(other)


def test_ops_are_named_by_topology_not_by_tensor_names(tmp_path):
    """Renaming every tensor changes nothing: the reader follows the data flow."""
    data = bytearray((MODELS / f"{IMAGENET}.tflite").read_bytes())
    for tensor in parse_model(bytes(data)).tensors:
        encoded = tensor.name.encode()
        start = data.find(struct.pack("<I", len(encoded)) + encoded) + 4  # a flatbuffer string: length, bytes
        data[start : start + len(encoded)] = b"x" * len(encoded)
    renamed = tmp_path / "renamed.tflite"
    renamed.write_bytes(bytes(data))
    assert all(set(t.name) == {"x"} for t in parse_model(bytes(data)).tensors)
    original, anonymous = TFLiteReader(MODELS / f"{IMAGENET}.tflite"), TFLiteReader(renamed)
    assert original.names() == anonymous.names()
    for name in original.names():
        np.testing.assert_array_equal(original.read(name), anonymous.read(name))


@pytest.mark.parametrize("name", REAL)
def test_topology_agrees_with_the_scope_names_these_files_keep(name):
    """Google's exports keep slim scope names in their weight tensors' names: the data-flow walk, which
    never reads them, must give every conv the scope its name says (the iNat head is called "Logits")."""
    reader = TFLiteReader(MODELS / f"{name}.tflite")
    convs = [step for step in reader.steps if step.scope is not None]
    scopes = [step.scope for step in convs] + ["Logits"]
    for step in convs:
        named = scope_of(reader.model.tensors[step.op.inputs[1]].name, scopes)
        assert named == step.scope or (named, name) == ("Logits", INAT)


@pytest.mark.parametrize("name", REBUILT)
def test_rebuilt_int8_models_hold_the_real_weights(name):
    """What the current converter writes: int8 input, int8 per-channel symmetric weights, int8 activations
    and int32 biases; and its weights are the real model's, within half a weight step per channel."""
    rebuilt, real = TFLiteReader(tflite_path(name)), TFLiteReader(MODELS / f"{name.removesuffix(INT8)}.tflite")
    assert rebuilt.quantized and rebuilt.model.tensors[rebuilt.model.inputs[0]].dtype == "int8"
    assert sorted(rebuilt.names()) == sorted(real.names())
    for step in rebuilt.steps:
        if step.scope is None:
            continue
        weight, bias, output = (rebuilt.model.tensors[i] for i in (*step.op.inputs[1:3], step.op.outputs[0]))
        scale = np.asarray(weight.quantization.scale)
        assert weight.dtype == "int8" and bias.dtype == "int32" and output.dtype == "int8"
        assert len(scale) == output.shape[-1] > 1 and not weight.quantization.zero_point.any()  # symmetric
        name = next(n for n in (f"{step.scope}/weights", f"{step.scope}/depthwise_weights") if n in real.names())
        steps = np.abs(rebuilt.read(name) - real.read(name)).reshape(-1, len(scale)) / scale
        assert steps.max() <= 0.5 * (1 + 1e-4), f"{name}: {steps.max():.4f} weight steps from the real weights"
        bias_name = next(n for n in (f"{step.scope}/biases", f"{step.scope}/BatchNorm/beta") if n in real.names())
        expected = real.read(bias_name)
        error = np.abs(rebuilt.read(bias_name) - expected).max() / np.abs(expected).max()
        assert error <= REBUILT_BIAS_ERROR, f"{bias_name}: {error:.2%} of max |bias| from the real biases"


# --- the dequantized float model -----------------------------------------------------------------


@pytest.mark.parametrize("name", [IMAGENET, IMAGENET_INT8])
def test_float_imagenet_keeps_the_interpreter_top1(converted, name):
    folder = converted(name)
    ours = MobileNetV2ForImageClassification.from_pretrained(folder)
    from transformers import MobileNetV2ForImageClassification as HFClassifier

    theirs_hf = HFClassifier.from_pretrained(folder).eval()
    interp = interpreter(tflite_path(name), reference_kernels=True)
    for image in CLASSIFICATION_IMAGES:
        quantized = quantized_image(IMAGES / f"{image}.bmp", 224)
        probabilities = invoke(interp, quantized)[0]
        with torch.no_grad():
            logits = ours(pixel_values(quantized)).logits[0].numpy()
            hf_logits = theirs_hf(pixel_values=pixel_values(quantized)).logits[0].numpy()
        top1 = (probabilities.argmax(), logits.argmax(), hf_logits.argmax())
        print(f"\n{image}: top-1 of TFLite {top1[0]}, ours {top1[1]}, transformers {top1[2]}")
        # Our top-1 is TFLite's, or tied with it at the maximum quantized probability.
        assert probabilities[logits.argmax()] == probabilities.max()
        assert hf_logits.argmax() == logits.argmax()


def test_float_inat_bird_keeps_the_interpreter_top1(converted):
    ours = MobileNetV2ForImageClassification.from_pretrained(converted(INAT))
    quantized = quantized_image(IMAGES / "bird.bmp", 224)
    probabilities = invoke(interpreter(MODELS / f"{INAT}.tflite"), quantized)[0]
    with torch.no_grad():
        logits = ours(pixel_values(quantized)).logits[0].numpy()
    assert probabilities[logits.argmax()] == probabilities.max()


# The real uint8 depth 1.0 model on the dog image: its per-tensor uint8 activations move 3.3% of the labels
# (measured 96.73% against the reference kernels, 98.84% against XNNPACK), and the emulated integer model is
# bit-exact there, so the float model misses the bar on that image by what the real model's quantization does.
UINT8_DOG_MISS = pytest.mark.xfail(
    strict=True, reason="the real uint8 DeepLab 1.0 moves 3.3% of the dog image's labels (96.73% agreement)"
)


@pytest.mark.parametrize(
    ("name", "image"),
    [
        pytest.param(name, image, marks=[UINT8_DOG_MISS] if (name, image) == (DEEPLAB, "dog_segmentation") else [])
        for name in (DEEPLAB, DEEPLAB_DM05)
        for image in SEGMENTATION_IMAGES
    ],
)
def test_float_deeplab_label_map_agrees(converted, name, image):
    from transformers import MobileNetV2ForSemanticSegmentation as HFSegmenter

    folder = converted(name)
    config = json.loads((folder / "config.json").read_text())
    assert (config["output_stride"], config["image_size"]) == (16, 513)
    quantized = quantized_image(IMAGES / f"{image}.bmp", 513)
    theirs = invoke(interpreter(tflite_path(name), reference_kernels=True), quantized)[0]
    ours = MobileNetV2ForSemanticSegmentation.from_pretrained(folder).predict_labels(pixel_values(quantized))[0]
    agreement = float((ours.numpy() == theirs).mean())
    with torch.no_grad():
        logits = HFSegmenter.from_pretrained(folder).eval()(pixel_values=pixel_values(quantized)).logits
    hf = F.interpolate(logits, size=(513, 513), mode="bilinear", align_corners=True).argmax(1)[0].numpy()
    hf_agreement = float((hf == theirs).mean())
    print(f"\n{name} {image}: float label map agrees with TFLite on {agreement:.2%} (transformers: {hf_agreement:.2%})")
    assert agreement >= FLOAT_PIXEL_AGREEMENT
    assert hf_agreement >= FLOAT_PIXEL_AGREEMENT


def dilated_conv_form(folder) -> str:
    """How the converter wrote the first dilated depthwise conv: its ops as the integer model runs them."""
    steps = json.loads((folder / QUANTIZATION_FILE).read_text())["steps"]
    conv = next(name for name, record in steps.items() if record.get("dilation", 1) > 1)
    chain = [conv] + [name for name in steps if name.rpartition(".")[0] == conv]
    return " -> ".join(steps[name]["op"] + (f" ({steps[name]['activation']})" if steps[name].get("activation") else "")
                       for name in chain)  # fmt: skip


@pytest.mark.parametrize("name", [DEEPLAB_INT8, DEEPLAB_DM05_INT8])
@pytest.mark.parametrize("image", SEGMENTATION_IMAGES)
def test_float_rebuilt_deeplab_is_the_file_s_float_model(converted, name, image, tmp_path, record_property):
    """The int8 DeepLabs the local converter writes differ between machines in the form of their dilated
    convs (recorded here, never a failure), and with it in how far their int8 activations move the labels
    (measured with the ADD-only form: the depth 0.5 model's dog labels agree 88% with its float model).
    So the float model is held to the float model the file stands for, run by the interpreter."""
    folder = converted(name)
    form = dilated_conv_form(folder)
    record_property("dilated_conv_form", form)
    quantized = quantized_image(IMAGES / f"{image}.bmp", 513)
    error, tolerance, equal = float_truth(folder, tflite_path(name), tmp_path / "float.tflite", quantized)
    theirs = invoke(interpreter(tflite_path(name), reference_kernels=True), quantized)[0]
    ours = MobileNetV2ForSemanticSegmentation.from_pretrained(folder).predict_labels(pixel_values(quantized))[0]
    int8_agreement = float((ours.numpy() == theirs).mean())
    print(
        f"\n{name} {image}: dilated convs written as {form}; float logits {error:.2e} from the dequantized "
        f"file's (tolerance {tolerance:.2e}), labels equal {equal:.4%}; label map agrees with the int8 "
        f"interpreter on {int8_agreement:.2%}"
    )
    assert error <= tolerance
    assert equal >= LABELS_EQUAL


# --- the integer model ---------------------------------------------------------------------------


def compare_steps(
    model: QuantizedMobileNetV2, interp, quantized: np.ndarray, steps: dict[str, QTensor] | None = None
) -> dict[str, tuple[int, float]]:
    """Step name -> (worst error in quantization steps, share of values within one step), for the model's
    `steps` on the image (run here if not given)."""
    invoke(interp, quantized)
    steps = model.run(pixel_values(quantized)) if steps is None else steps
    errors = {}
    for name, record in model.records.items():
        if name not in steps:  # a reshape: no arithmetic
            continue
        theirs = interp.get_tensor(record["tensor"]).astype(np.int64)
        ours = steps[name].values.numpy()
        ours = (ours.transpose(0, 2, 3, 1) if ours.ndim == 4 else ours).reshape(theirs.shape)
        difference = np.abs(ours - theirs)
        errors[name] = (int(difference.max()), float((difference <= 1).mean()))
    return errors


def report(name: str, errors: dict[str, tuple[int, float]], output: str) -> None:
    worst = max(errors.items(), key=lambda item: item[1][0])
    print(
        f"\n{name}: {len(errors)} steps compared, worst {worst[1][0]} steps (at {worst[0]}); output "
        f"{errors[output][1]:.4%} within one step"
    )


def dequantized_output(interp, values: np.ndarray) -> np.ndarray:
    scale, zero_point = interp.get_output_details()[0]["quantization"]
    return scale * (values.astype(np.float64) - zero_point)


@pytest.mark.parametrize("name", [IMAGENET, IMAGENET_INT8])
def test_integer_imagenet_reproduces_the_interpreter(converted, name):
    model = QuantizedMobileNetV2.from_pretrained(converted(name))
    interp = interpreter(tflite_path(name), preserve_all_tensors=True, reference_kernels=True)
    step = interp.get_output_details()[0]["quantization"][0]
    for image in CLASSIFICATION_IMAGES:
        quantized = quantized_image(IMAGES / f"{image}.bmp", 224)
        errors = compare_steps(model, interp, quantized)
        report(f"{name} {image}", errors, "softmax")
        assert errors["softmax"][1] >= WITHIN_ONE_STEP
        assert max(worst for worst, _ in errors.values()) <= 1
        output = model(pixel_values(quantized))
        theirs = invoke(interp, quantized)[0]
        theirs_probabilities = dequantized_output(interp, theirs)
        np.testing.assert_allclose(output.probabilities[0].numpy(), theirs_probabilities, atol=step + 1e-6)
        assert output.logits[0].argmax() == int(np.argmax(theirs)) or theirs[output.logits[0].argmax()] == theirs.max()
        # The default interpreter (XNNPACK) is not bit-exact with the reference kernels (intermediate tensors
        # drift by a few steps); measured for the record, the reference kernels being the specification.
        optimized = interpreter(tflite_path(name))
        optimized_probabilities = dequantized_output(optimized, invoke(optimized, quantized)[0])
        within = float((np.abs(output.probabilities[0].numpy() - optimized_probabilities) <= step + 1e-6).mean())
        print(f"  against the default interpreter (XNNPACK): softmax within one step {within:.2%}")


def test_integer_inat_bird_reproduces_the_interpreter(converted):
    """The iNaturalist classifier ends in a FULLY_CONNECTED op instead of a 1x1 conv."""
    model = QuantizedMobileNetV2.from_pretrained(converted(INAT))
    interp = interpreter(MODELS / f"{INAT}.tflite", preserve_all_tensors=True, reference_kernels=True)
    errors = compare_steps(model, interp, quantized_image(IMAGES / "bird.bmp", 224))
    report(INAT, errors, "softmax")
    assert model.records["classifier"]["op"] == "FULLY_CONNECTED"
    assert errors["classifier"][1] >= WITHIN_ONE_STEP and errors["softmax"][1] >= WITHIN_ONE_STEP
    assert max(worst for worst, _ in errors.values()) <= 1


@pytest.mark.parametrize("name", [DEEPLAB, DEEPLAB_DM05, DEEPLAB_INT8, DEEPLAB_DM05_INT8])
def test_integer_deeplab_reproduces_the_label_map(converted, name):
    folder = converted(name)
    model = QuantizedMobileNetV2.from_pretrained(folder)
    interp = interpreter(tflite_path(name), preserve_all_tensors=True, reference_kernels=True)
    optimized = interpreter(tflite_path(name))
    for image in SEGMENTATION_IMAGES:
        quantized = quantized_image(IMAGES / f"{image}.bmp", 513)
        steps = model.run(pixel_values(quantized))  # one run of the integer model at 513 takes seconds
        errors = compare_steps(model, interp, quantized, steps)
        report(f"{name} {image}", errors, "segmentation_head.classifier")
        labels = steps["labels"].values[0].numpy()
        equal = float((labels == interp.get_tensor(interp.get_output_details()[0]["index"])[0]).mean())
        # Measured for the record: the default interpreter (XNNPACK) is not bit-exact with the reference kernels.
        optimized_equal = float((labels == invoke(optimized, quantized)[0]).mean())
        print(f"  label map: {equal:.4%} of pixels equal ({optimized_equal:.4%} with the default interpreter, XNNPACK)")
        assert equal >= LABELS_EQUAL
        assert errors["segmentation_head.classifier"][1] >= WITHIN_ONE_STEP
        assert max(worst for step, (worst, _) in errors.items() if step != "labels") <= 1
    twin = model.float_twin()
    assert isinstance(twin, MobileNetV2ForSemanticSegmentation)
    assert (folder / QUANTIZATION_FILE).is_file()
