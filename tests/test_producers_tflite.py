"""TFLite files from every producer convert with no flag and compute what the producing framework computes on
real images (``../shared/realdata/images``).

- Keras 3 and tf_keras ``MobileNetV2`` (seeded random weights, ``fixtures/keras_tflite_builder.py``) made into
  ``.tflite`` by ``from_keras_model`` and ``from_saved_model``, as float32, float16, dynamic-range, int8 and
  uint8, at depths 1.0 and 0.35 and sizes 96 and 97. Truth: float32 files against the Keras model itself
  (max |ours - ref| / max |ref| <= 1e-4 on the probabilities); float16 files against the interpreter on the file
  (its weights are the float16 ones); dynamic-range files: the interpreter's top-1 on every image; full-integer
  files: the integer model within one step of the interpreter's reference kernels on >= 99% of the outputs,
  with its top-1.
- The producers' other forms of a layer, made by editing a Keras-made file (whatever this machine's converter
  writes): a PAD ahead of a VALID conv, a ReLU6 as an op of its own or as a MINIMUM / MAXIMUM clamp. Truth: the
  interpreter on the edited file.
- DeepLab float files ending in the logits or the logits resized to the input (no ARG_MAX), at 257 and 513:
  the kind is read from the topology, the output form is recorded. Truth: the interpreter's logits.

Run with ``-rA -s`` to see the measured differences (``docs/producers.md`` holds the matrix).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.errors import MappingError
from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation
from mobilenet_torch.quantized import QuantizedMobileNetV2
from tests.realdata_tflite import IMAGES, interpreter, pixel_values, quantized_image

tf = pytest.importorskip("tensorflow", reason="TensorFlow's TFLite converter makes the producers' files")
pytest.importorskip("PIL", reason="pillow is needed to read the real images")
if not IMAGES.is_dir():
    pytest.skip(f"{IMAGES} is absent: the producers' files are checked on real images", allow_module_level=True)

from fixtures.keras_open_size import open_size_tflite  # noqa: E402 (after the skips)
from fixtures.keras_tflite_builder import build_keras_tflite, keras_model  # noqa: E402
from fixtures.tflite_builder import build_tflite  # noqa: E402
from tests.tflite_editing import TFLiteEditor, explicit_pad, unfuse_relu6  # noqa: E402

REAL_IMAGES = ("bird", "cat", "dragonfly", "grace_hopper", "missvickie_potato_chips")
FLOAT_BAR = 1e-4  # max |ours - ref| / max |ref|
INTEGER_WITHIN_ONE = 0.99
DEEPLAB_VARIANT = "deeplabv3_mnv2_dm05_pascal_trainaug"

# (producer, depth, size, route): every producer, route, depth and size, one odd size per producer.
FLOAT_CASES = [
    ("keras", 0.35, 97, "keras"),
    ("tf_keras", 0.35, 96, "saved_model"),
    pytest.param("keras", 1.0, 96, "saved_model", marks=pytest.mark.slow),
    pytest.param("tf_keras", 1.0, 97, "keras", marks=pytest.mark.slow),
]
# (producer, depth, size, route, mode) of the quantized files.
QUANTIZED_CASES = [
    ("keras", 0.35, 97, "keras", "float16"),
    ("tf_keras", 0.35, 96, "saved_model", "dynamic"),
    ("keras", 0.35, 96, "saved_model", "int8"),
    ("tf_keras", 0.35, 97, "keras", "uint8"),
    pytest.param("tf_keras", 1.0, 96, "keras", "int8", marks=pytest.mark.slow),
    pytest.param("keras", 1.0, 97, "saved_model", "uint8", marks=pytest.mark.slow),
]


def images(size: int) -> np.ndarray:
    """The real images at size x size, uint8 NHWC."""
    return np.concatenate([quantized_image(IMAGES / f"{name}.bmp", size) for name in REAL_IMAGES])


def real(quantized: np.ndarray) -> np.ndarray:
    """(q - 128) / 128, NHWC float32: the input both the source and our model take."""
    return pixel_values(quantized).numpy().transpose(0, 2, 3, 1).copy()


def run_file(
    path, quantized: np.ndarray, tensors: tuple[int, ...] = (), reference_kernels: bool = False
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The file's output on the images, and the value of each of `tensors`, its input quantized as TFLite's
    QUANTIZE does. TFLite's built-in kernels unless `reference_kernels`: those abort on some of the int8
    graphs that the converter makes from Keras (a fused-activation MEAN)."""
    interp = interpreter(path, preserve_all_tensors=bool(tensors), reference_kernels=reference_kernels)
    detail = interp.get_input_details()[0]
    outputs, values_of = [], {tensor: [] for tensor in tensors}
    for image in real(quantized):
        values = image[None]
        if detail["dtype"] != np.float32:
            scale, zero_point = detail["quantization"]
            limits = np.iinfo(detail["dtype"])
            values = np.clip(np.round(values / scale) + zero_point, limits.min, limits.max).astype(detail["dtype"])
        interp.set_tensor(detail["index"], values)
        interp.invoke()
        outputs.append(interp.get_tensor(interp.get_output_details()[0]["index"])[0].copy())
        for tensor in tensors:
            values_of[tensor].append(interp.get_tensor(tensor).copy())
    return np.stack(outputs), {tensor: np.concatenate(found) for tensor, found in values_of.items()}


def float_probabilities(folder, quantized: np.ndarray) -> np.ndarray:
    model = MobileNetV2ForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return torch.softmax(model(pixel_values(quantized)).logits, dim=-1).numpy()


def relative(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def conversion_notes(folder) -> list[str]:
    return json.loads((folder / "conversion.json").read_text())["notes"]


@pytest.mark.parametrize("producer, depth, size, route", FLOAT_CASES)
def test_float_keras_files_match_keras(tmp_path, producer, depth, size, route):
    path = build_keras_tflite(producer, depth, size, route, "float")
    convert_checkpoint(path, tmp_path / "out")
    pixels = images(size)
    reference = np.asarray(keras_model(producer, depth, size)(real(pixels), training=False))
    difference = relative(float_probabilities(tmp_path / "out", pixels), reference)
    print(f"\n{producer} {route} float32 {depth} {size}: {difference:.2e} of the Keras model's probabilities")
    assert difference <= FLOAT_BAR
    assert "the source's output: class probabilities (SOFTMAX)" in conversion_notes(tmp_path / "out")


def test_fine_tuned_head_keeps_its_classes(tmp_path):
    """The transfer recipe (GAP -> Dropout -> Dense(3)): three classes, no background."""
    path = build_keras_tflite("keras", 0.35, 96, "keras", "float", classes=3)
    convert_checkpoint(path, tmp_path / "out")
    pixels = images(96)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(config["id2label"]) == 3
    reference = np.asarray(keras_model("keras", 0.35, 96, classes=3)(real(pixels), training=False))
    difference = relative(float_probabilities(tmp_path / "out", pixels), reference)
    print(f"\nkeras fine-tuned 3-class head: {difference:.2e} of the Keras model's probabilities")
    assert difference <= FLOAT_BAR


def test_a_stack_of_dense_layers_converts(tmp_path):
    """The transfer recipe with Teachable Machine's head, GAP -> Dropout -> Dense(100, relu) -> Dense(4, no bias),
    as a functional model: the hidden layer is `classifier_layers`, the last one the classifier."""
    path = build_keras_tflite("tf_keras", 0.35, 96, "keras", "float", classes=4, hidden=100)
    convert_checkpoint(path, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["classifier_layers"] == [{"units": 100, "activation": "relu"}] and len(config["id2label"]) == 4
    pixels = images(96)
    reference = np.asarray(keras_model("tf_keras", 0.35, 96, classes=4, hidden=100)(real(pixels), training=False))
    difference = relative(float_probabilities(tmp_path / "out", pixels), reference)
    print(f"\ntf_keras Dense(100, relu) -> Dense(4) head: {difference:.2e} of the Keras model's probabilities")
    assert difference <= FLOAT_BAR


@pytest.mark.parametrize("producer, depth, size, route, mode", QUANTIZED_CASES)
def test_quantized_keras_files_match_the_interpreter(tmp_path, producer, depth, size, route, mode):
    path = build_keras_tflite(producer, depth, size, route, mode)
    convert_checkpoint(path, tmp_path / "out")
    pixels = images(size)
    label = f"\n{producer} {route} {mode} {depth} {size}:"
    if mode in ("float16", "dynamic"):
        theirs, _ = run_file(path, pixels)
        ours = float_probabilities(tmp_path / "out", pixels)
        print(f"{label} {relative(ours, theirs):.2e} of the file's probabilities, top-1 equal")
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
        if mode == "float16":
            assert relative(ours, theirs) <= FLOAT_BAR
        return
    model = QuantizedMobileNetV2.from_pretrained(tmp_path / "out")
    softmax = model.records["softmax"]["tensor"]
    theirs = run_file(path, pixels, (softmax,))[1][softmax].astype(np.int64).reshape(len(pixels), -1)
    ours = model.run(pixel_values(pixels))["softmax"].values.numpy().reshape(len(pixels), -1)
    share, worst = float((np.abs(ours - theirs) <= 1).mean()), int(np.abs(ours - theirs).max())
    print(f"{label} integer model within one step on {share:.4%} of the outputs (worst {worst} steps)")
    assert share >= INTEGER_WITHIN_ONE
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def edited(tmp_path, edit) -> object:
    """The keras float file (0.35, 97) edited by `edit(editor)`."""
    editor = TFLiteEditor(build_keras_tflite("keras", 0.35, 97, "keras", "float").read_bytes())
    edit(editor)
    path = tmp_path / "edited.tflite"
    path.write_bytes(editor.to_bytes())
    return path


def relu6_convs(editor: TFLiteEditor) -> list:
    relu6 = editor.activation(True)
    return [
        op for op in editor.convs("CONV_2D", "DEPTHWISE_CONV_2D") if op.builtinOptions.fusedActivationFunction == relu6
    ]


def same_pads(editor: TFLiteEditor, conv) -> tuple[tuple[int, int], tuple[int, int]]:
    from mobilenet_torch.architecture import same_padding

    size = editor.tensor(conv.inputs[0]).shape[1]
    pads = same_padding(size, editor.tensor(conv.inputs[1]).shape[1], conv.builtinOptions.strideH)
    return pads, pads


def strided(editor: TFLiteEditor) -> list:
    return [op for op in editor.convs("CONV_2D", "DEPTHWISE_CONV_2D") if op.builtinOptions.strideH == 2]


FORMS = {
    "RELU6": lambda editor: [unfuse_relu6(editor, conv, "RELU6") for conv in relu6_convs(editor)],
    "clamp": lambda editor: [unfuse_relu6(editor, conv, "clamp", i) for i, conv in enumerate(relu6_convs(editor))],
    "PAD": lambda editor: [explicit_pad(editor, conv, same_pads(editor, conv)) for conv in strided(editor)],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_producer_form_of_a_layer_converts(tmp_path, form):
    path = edited(tmp_path, FORMS[form])
    convert_checkpoint(path, tmp_path / "out")
    pixels = images(97)
    theirs, _ = run_file(path, pixels)
    editor = TFLiteEditor(path.read_bytes())
    ops = {editor.op_name(op) for op in editor.graph.operators}
    assert {"RELU6": {"RELU6"}, "clamp": {"MINIMUM", "MAXIMUM"}, "PAD": {"PAD"}}[form] <= ops
    difference = relative(float_probabilities(tmp_path / "out", pixels), theirs)
    print(f"\nform {form}: {difference:.2e} of the edited file's probabilities")
    assert difference <= FLOAT_BAR


# A conv to pad, by the scope the refusal names: a stride-2 depthwise conv (input 49 at 97) and a stride-1 one.
PADDED_CONVS = {
    "MobilenetV2/expanded_conv_1/depthwise": lambda editor: strided(editor)[1],
    "MobilenetV2/expanded_conv/depthwise": lambda editor: next(
        op for op in editor.convs("DEPTHWISE_CONV_2D") if op.builtinOptions.strideH == 1
    ),
}


@pytest.mark.parametrize(
    "scope, amounts",
    [
        ("MobilenetV2/expanded_conv_1/depthwise", ((1, 0), (1, 0))),
        ("MobilenetV2/expanded_conv_1/depthwise", ((0, 1), (1, 1))),
        ("MobilenetV2/expanded_conv/depthwise", ((0, 1), (0, 1))),
    ],
)
def test_padding_other_than_same_or_keras_bottom_right_is_refused(tmp_path, scope, amounts):
    """A PAD that is neither TF's SAME at its size nor Keras' (0, 1) of a stride-2 conv: refused, naming the conv,
    the op and the amounts (a stride-1 conv padded (0, 1) is no padding Keras writes)."""
    path = edited(tmp_path, lambda editor: explicit_pad(editor, PADDED_CONVS[scope](editor), amounts))
    shown = re.escape(f"pads {amounts} (h, w: before, after) at size")
    with pytest.raises(MappingError, match=rf"^{scope}: op \d+ {shown} \(\d+, \d+\), which is neither"):
        convert_checkpoint(path, tmp_path / "out")


# Files that TF's converter makes from Keras' MobileNetV2 built for any input size (`input_shape=(None, None,
# 3)`), its input then fixed: Keras pads each strided depthwise conv (0, 1), written as a PAD ahead of a VALID
# conv where that is not TF's SAME (an odd input: 49 at 97), folded into a SAME conv where it is.
OPEN_SIZE_FLOAT_CASES = [("keras3", 97, ["same", "bottom_right", "same", "same", "same"]), ("tf_keras", 96, None)]
OPEN_SIZE_INTEGER_CASES = [("tf_keras", 97, "int8"), ("keras3", 97, "uint8")]


@pytest.mark.parametrize("producer, size, paddings", OPEN_SIZE_FLOAT_CASES)
def test_an_open_size_keras_model_s_float_file_matches_the_interpreter(tmp_path, producer, size, paddings):
    path = open_size_tflite(producer, size)
    convert_checkpoint(path, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["strided_padding"] == paddings
    pixels = images(size)
    theirs, _ = run_file(path, pixels)
    model = MobileNetV2ForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ours = model(pixel_values(pixels)).logits.numpy()
    difference = relative(ours, theirs)
    print(f"\nopen-size {producer} float32 0.35 {size}: {difference:.2e} of the file's logits")
    assert difference <= FLOAT_BAR
    assert np.abs(theirs[0] - theirs[1]).max() > 1e-2 * np.abs(theirs).max()  # the logits depend on the image


@pytest.mark.parametrize("producer, size, mode", OPEN_SIZE_INTEGER_CASES)
def test_an_open_size_keras_model_s_integer_file_matches_the_reference_kernels(tmp_path, producer, size, mode):
    path = open_size_tflite(producer, size, mode)
    convert_checkpoint(path, tmp_path / "out")
    model = QuantizedMobileNetV2.from_pretrained(tmp_path / "out")
    assert "bottom_right" in model.config.strided_padding
    shares, worst, top1_equal = every_step_within_one(model, path, images(size), reference_kernels=True)
    share = min(shares.values())
    print(f"\nopen-size {producer} {mode} 0.35 {size}: every step within one step on >= {share:.4%} (worst {worst})")
    assert min(shares.values()) >= INTEGER_WITHIN_ONE
    assert top1_equal


def test_verify_passes_on_an_open_size_keras_model_s_float_file(tmp_path):
    from click.testing import CliRunner

    from converter.app.cli import verify_main

    path = open_size_tflite("keras3", 97)
    convert_checkpoint(path, tmp_path / "out")
    result = CliRunner().invoke(verify_main, ["--checkpoint", str(path), "--model", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_integer_model_runs_a_separate_relu6_after_any_conv(tmp_path):
    """Every fused ReLU6 of an int8 Keras file made a RELU6 op of its own: each step within one step of the
    interpreter on >= 99% of its values. The conv's output keeps the ReLU6's scale (around 0), so that a
    one-step rounding difference of the built-in conv kernels stays one step after the RELU6."""
    source = build_keras_tflite("keras", 0.35, 96, "saved_model", "int8")
    editor = TFLiteEditor(source.read_bytes())
    for conv in relu6_convs(editor):
        unfuse_relu6(editor, conv, "RELU6", widen=1)
    path = tmp_path / "edited.tflite"
    path.write_bytes(editor.to_bytes())
    convert_checkpoint(path, tmp_path / "out")
    model = QuantizedMobileNetV2.from_pretrained(tmp_path / "out")
    assert model.after_conv["mobilenet_v2.conv_stem.first_conv"] == ["mobilenet_v2.conv_stem.first_conv.relu6"]
    shares, _, top1_equal = every_step_within_one(model, path, images(96))
    print(f"\nint8 with separate RELU6 ops: every step within one step on >= {min(shares.values()):.4%} of its values")
    assert min(shares.values()) >= INTEGER_WITHIN_ONE
    assert top1_equal


def every_step_within_one(
    model: QuantizedMobileNetV2, path, pixels: np.ndarray, reference_kernels: bool = False
) -> tuple[dict[str, float], int, bool]:
    """({step: the share of its values within one step of the interpreter's}, the largest difference in steps,
    whether the top-1 of the last step is the file output's on every image)."""
    steps = model.run(pixel_values(pixels))
    compared = {name: record["tensor"] for name, record in model.records.items() if name in steps}
    outputs, theirs = run_file(path, pixels, tuple(compared.values()), reference_kernels)
    shares, worst = {}, 0
    for name, tensor in compared.items():
        ours = steps[name].values.numpy()
        ours = (ours.transpose(0, 2, 3, 1) if ours.ndim == 4 else ours).reshape(theirs[tensor].shape)
        difference = np.abs(ours - theirs[tensor].astype(np.int64))
        shares[name], worst = float((difference <= 1).mean()), max(worst, int(difference.max()))
    last = steps[list(steps)[-1]].values.numpy().reshape(len(pixels), -1)
    return shares, worst, bool((last.argmax(-1) == outputs.reshape(len(pixels), -1).argmax(-1)).all())


@pytest.mark.parametrize("size", [257, pytest.param(513, marks=pytest.mark.slow)])
@pytest.mark.parametrize("output", ["logits", "logits_resized"])
def test_deeplab_without_arg_max(tmp_path, size, output):
    path = build_tflite(DEEPLAB_VARIANT, "float", size, output)
    convert_checkpoint(path, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MobileNetV2ForSemanticSegmentation"] and config["output_stride"] == 8
    form = {"logits": "logits", "logits_resized": "logits resized to the input (RESIZE_BILINEAR)"}[output]
    assert f"the source's output: {form}" in conversion_notes(tmp_path / "out")
    pixels = quantized_image(IMAGES / "dog_segmentation.bmp", size)
    theirs, _ = run_file(path, pixels)
    model = MobileNetV2ForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        logits = model(pixel_values(pixels)).logits
        if output == "logits_resized":
            logits = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
    ours = logits.numpy().transpose(0, 2, 3, 1)
    difference = relative(ours, theirs)
    labels_equal = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    print(f"\nDeepLab {output} at {size}: {difference:.2e} of the file's logits, labels equal {labels_equal:.4%}")
    assert difference <= (1e-3 if output == "logits_resized" else FLOAT_BAR)
    assert labels_equal >= 0.999
