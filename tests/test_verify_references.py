"""The verifier against the originals that are not TF checkpoints, each run by TensorFlow itself: a
SavedModel's own serving signature (TF1 and TF2 writers), a TFLite interpreter with reference kernels.
A faithful conversion passes, a planted fault fails, an unsafe original is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers import SMALL

pytest.importorskip("tensorflow")

FAULTY_BIAS = "mobilenet_v2.layer.6.reduce_1x1.normalization.bias"


def verify(*args) -> tuple[int, str, dict]:
    from converter.app.cli import verify_main

    result = CliRunner().invoke(verify_main, [str(arg) for arg in args], catch_exceptions=False)
    model = Path(args[list(args).index("--model") + 1])
    report = model / "parity" / "parity.json"
    return result.exit_code, result.output, json.loads(report.read_text()) if report.is_file() else {}


def convert(source: Path, folder: Path) -> Path:
    from converter import convert_checkpoint

    convert_checkpoint(source, folder)
    return folder


def with_fault(model: Path, folder: Path) -> Path:
    """A copy of `model` with one BatchNorm bias of block expanded_conv_7 off by 0.5."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(model, folder)
    weights = load_file(folder / "model.safetensors")
    weights[FAULTY_BIAS] = weights[FAULTY_BIAS].copy()
    weights[FAULTY_BIAS][3] += 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# ------------------------------------------------------------------------------------------ SavedModel
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """style -> (SavedModel written by TF's own writer, the folder converted from it): the plain exports
    taking [-1, 1] and those in TF Hub's form (images in [0, 1], scaled inside)."""
    from fixtures.savedmodel_builder import STYLES, write_saved_model

    root = tmp_path_factory.mktemp("saved_models")
    out = {}
    for style in STYLES:
        source = write_saved_model(SMALL, root / style, style)
        out[style] = source, convert(source, root / f"{style}-converted")
    return out


@pytest.mark.parametrize("style", ["tf1", "tf2"])
def test_a_saved_model_is_the_reference_and_a_faithful_conversion_passes(saved_models, style):
    source, model = saved_models[style]
    code, output, report = verify("--checkpoint", source, "--model", model)
    assert code == 0, output
    assert report["reference"]["kind"] == "saved_model"
    assert report["reference"]["input_tensor"] == "serving_default:images"
    logits = [entry for entry in report["endpoints"] if entry["endpoint"] == "logits"]
    assert logits[0]["compared"] and logits[0]["passed"]
    assert len(report["inputs"]) == 3  # the signature takes any size: native, odd and non-square
    skipped = {entry["endpoint"]: entry["reason"] for entry in report["not_compared"]}
    if style == "tf1":  # one graph: the endpoints on the signature's path are fetched from it too
        assert not skipped and all(entry["compared"] and entry["passed"] for entry in report["endpoints"])
    else:  # functions run as a whole: every endpoint but the signature's logits is listed with that reason
        assert "layer_1" in skipped and "logits" not in skipped and len(skipped) == len(report["endpoints"]) - 1
        assert "serving_default signature exposes only logits" in skipped["layer_1"]
    # The saver is loaded but only the forward pass may run: it is counted apart.
    assert "RestoreV2" in report["reference"]["left_out_ops"]
    assert "RestoreV2" not in report["reference"]["imported_ops"]


@pytest.mark.parametrize("style", ["hub-tf1", "hub-tf2"])
def test_a_hub_form_saved_model_is_fed_its_own_input_range_and_a_faithful_conversion_passes(saved_models, style):
    from fixtures.savedmodel_builder import FORMS

    source, model = saved_models[style]
    code, output, report = verify("--checkpoint", source, "--model", model)
    assert code == 0, output
    form = FORMS[style]
    assert report["reference"]["input_tensor"] == f"{form.signature}:{form.input}"
    assert report["reference"]["input_range"] == list(form.input_range)  # [0, 1], as the fixture was built
    assert any("read off its graph" in note and "hub_input/" in note for note in report["notes"])
    entries = {entry["endpoint"]: entry for entry in report["endpoints"]}
    assert entries["logits"]["compared"] and entries["logits"]["passed"]
    if style == "hub-tf1":  # a TF1 graph: every endpoint on the signature's path is compared too
        assert all(entry["compared"] and entry["passed"] for entry in report["endpoints"])
    else:  # Kaggle's bare output, named output_0 by TF's writer
        assert any("only output, output_0 ([batch, 1001]), is taken as the logits" in n for n in report["notes"])


@pytest.mark.parametrize("style", ["tf1", "tf2", "hub-tf1", "hub-tf2"])
def test_a_planted_fault_fails_against_a_saved_model(saved_models, style, tmp_path):
    source, model = saved_models[style]
    code, output, report = verify("--checkpoint", source, "--model", with_fault(model, tmp_path / "faulty"))
    assert code == 1, output
    # A TF1 graph is fetched at every endpoint, so the fault shows where it is; a TF2 one at its logits.
    assert report["first_divergence"]["endpoint"] == ("layer_9" if style.endswith("tf1") else "logits")
    assert report["first_divergence"]["ratio"] > 1


@pytest.mark.parametrize("style", ["hub-tf1", "hub-tf2"])
def test_the_input_scaling_read_off_the_graph_is_what_the_graph_computes(saved_models, style):
    """The reference fed through the scaling it read off the Hub-form graph gives, on images in [-1, 1],
    the logits that TensorFlow gives for the plain export of the same weights on those images."""
    from converter.formats.base import References
    from converter.verify.references import LOGITS_TENSOR, open_reference
    from fixtures.savedmodel_builder import run_saved_model
    from tests.helpers import logit_tolerance, random_images

    source, _ = saved_models[style]
    images = random_images((96, 96), batch=2, seed=7)
    expected = run_saved_model(saved_models["tf1"][0], images)
    reference = open_reference(
        References(saved_model=source), kind="classification", depth=0.35, convention="ema", tensors=[LOGITS_TENSOR]
    )
    with reference:
        assert reference.info.input_range == [0.0, 1.0]
        logits = reference.run(images, [LOGITS_TENSOR])[LOGITS_TENSOR]
    assert np.abs(logits - expected).max() <= logit_tolerance(expected)
    # and the unit-range images TF Hub's signature documents, fed to TensorFlow directly, agree
    unit = run_saved_model(source, (images + 1) / 2, style)
    assert np.abs(unit - expected).max() <= logit_tolerance(expected)


class _StemOnly:
    """A SavedModel holding the slim stem variable whose signature puts its images through `prepare` before
    a convolution named as slim's (or named otherwise)."""

    @staticmethod
    def write(folder: Path, prepare, conv_scope: str = "MobilenetV2/Conv") -> Path:
        import tensorflow as tf

        module = tf.Module()
        kernel = np.random.default_rng(0).standard_normal((3, 3, 3, 16)).astype(np.float32)
        module.weights = tf.Variable(kernel, name="MobilenetV2/Conv/weights")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def serve(images):
            with tf.name_scope(conv_scope):
                net = tf.nn.conv2d(prepare(images), module.weights, 1, "SAME", name="Conv2D")
            return {"logits": tf.reduce_mean(net, axis=[1, 2])}

        module.serve = serve
        tf.saved_model.save(module, str(folder), signatures={"serving_default": serve})
        return folder


@pytest.mark.parametrize(
    ("prepare", "input_range"),
    [
        (lambda x: x / 127.5 - 1.0, [0.0, 255.0]),  # the Keras recipe's pixels
        (lambda x: 1.0 - x * 2.0, [0.0, 1.0]),  # a constant minus the input: the range flips back
        (lambda x: (x + 3.0) / 2.0, [-5.0, -1.0]),
    ],
    ids=["pixels", "flipped", "shifted"],
)
def test_the_scaling_is_composed_from_the_ops_in_the_order_they_run(tmp_path, prepare, input_range):
    """Fed through the scaling it read off the graph, the SavedModel's stem gives on images in [-1, 1] what
    TensorFlow gives for the same stem fed those images unscaled."""
    import tensorflow as tf

    from converter.formats.base import References
    from converter.verify.references import LOGITS_TENSOR, open_reference
    from tests.helpers import random_images

    images = random_images((16, 16), batch=2, seed=3)
    plain = tf.saved_model.load(str(_StemOnly.write(tmp_path / "plain", lambda x: x)))
    expected = plain.signatures["serving_default"](images=tf.constant(images))["logits"].numpy()
    source = _StemOnly.write(tmp_path / "scaled", prepare)
    reference = open_reference(
        References(saved_model=source), kind="classification", depth=1.0, convention="ema", tensors=[LOGITS_TENSOR]
    )
    with reference:
        assert reference.info.input_range == pytest.approx(input_range)
        logits = reference.run(images, [LOGITS_TENSOR])[LOGITS_TENSOR]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("prepare", "conv_scope", "message"),
    [
        (lambda x: x * x * 2.0 - 1.0, "MobilenetV2/Conv", "computes Mul .*which is not a scaling by a constant"),
        (lambda x: 2.0 / x, "MobilenetV2/Conv", "computes RealDiv .*which is not a scaling by a constant"),
        (lambda x: x * 2.0 - 1.0, "stem", "no op.s. named MobilenetV2/Conv/Conv2D on its signature's path"),
    ],
    ids=["square", "reciprocal", "unnamed-convolution"],
)
def test_an_input_path_that_is_not_a_scaling_is_a_clear_error(saved_models, tmp_path, prepare, conv_scope, message):
    source = _StemOnly.write(tmp_path / "stem", prepare, conv_scope)
    _, model = saved_models["tf2"]
    code, output, _ = verify("--checkpoint", source, "--model", model, "--report-dir", tmp_path / "reports")
    assert code == 2, output
    assert re.search(message, output) and "verify the conversion against the slim checkpoint" in output
    assert not (tmp_path / "reports").exists()


class _ReadsAFile:
    """A SavedModel holding the slim stem variable whose signature reads a file."""

    @staticmethod
    def write(folder: Path, secret: Path) -> Path:
        import tensorflow as tf

        module = tf.Module()
        module.weights = tf.Variable(np.zeros((3, 3, 3, 16), np.float32), name="MobilenetV2/Conv/weights")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def serve(images):
            length = tf.cast(tf.strings.length(tf.io.read_file(str(secret))), tf.float32)
            return {"logits": tf.reduce_mean(images, axis=[1, 2]) * 0.0 + length + tf.reduce_sum(module.weights)}

        module.serve = serve
        tf.saved_model.save(module, str(folder), signatures={"serving_default": serve})
        return folder


def test_a_saved_model_whose_signature_reads_a_file_is_refused(saved_models, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the verifier")
    source = _ReadsAFile.write(tmp_path / "reads_a_file", secret)
    _, model = saved_models["tf2"]
    code, output, _ = verify("--checkpoint", source, "--model", model, "--report-dir", tmp_path / "reports")
    assert code == 2, output
    assert "ReadFile" in output and "reads or writes files" in output
    assert not (tmp_path / "reports").exists()


# ---------------------------------------------------------------------------------------------- TFLite
REAL_TFLITE = "mobilenet_v2_1.0_224_quant.tflite"
INTEGER_FAULT = "mobilenet_v2.layer.10.expand_1x1.bias"


@pytest.fixture(scope="module", params=["float", "float16"])
def float_tflite(tmp_path_factory, request) -> tuple[Path, Path]:
    """(a float32 or float16 .tflite from TensorFlow's own converter, the folder converted from it): the
    interpreter widens float16 weights to float32, so both are held to the float tolerance."""
    from fixtures.tflite_builder import build_tflite

    source = build_tflite(SMALL, request.param)
    return source, convert(source, tmp_path_factory.mktemp("tflite") / request.param)


def test_a_float_tflite_is_compared_layer_by_layer_by_the_reference_interpreter(float_tflite):
    source, model = float_tflite
    code, output, report = verify("--checkpoint", source, "--model", model)
    assert code == 0, output
    assert report["reference"]["kind"] == "tflite"
    assert "BUILTIN_REF" in " ".join(report["notes"])
    compared = [entry for entry in report["endpoints"] if entry["compared"]]
    assert len(compared) == len(report["endpoints"]) == 37  # every slim endpoint, layer by layer
    assert all(entry["passed"] for entry in compared)
    # The interpreter fixes the input at 96x96 (batch 1): the other sizes are skipped, saying so.
    assert [case["name"] for case in report["inputs"]] == ["random-96x96"]
    assert any("fixes its input at 96x96" in note for note in report["notes"])


def test_a_planted_fault_is_localised_against_a_float_tflite(float_tflite, tmp_path):
    source, model = float_tflite
    code, output, report = verify("--checkpoint", source, "--model", with_fault(model, tmp_path / "faulty"))
    assert code == 1, output
    assert report["first_divergence"]["endpoint"] == "layer_9"  # the output of block expanded_conv_7
    assert all(entry["passed"] for entry in report["endpoints"] if entry["endpoint"] in ("layer_1", "layer_8"))


def test_a_dynamic_range_tflite_is_refused_as_a_reference_saying_why(tmp_path):
    from fixtures.tflite_builder import build_tflite

    source = build_tflite(SMALL, "dynamic")
    model = convert(source, tmp_path / "dynamic")
    code, output, _ = verify("--checkpoint", source, "--model", model, "--report-dir", tmp_path / "reports")
    assert code == 2, output
    assert "dynamic-range model" in output and "quantize each layer's float input to int8" in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "reports").exists()


@pytest.fixture(scope="module")
def real_tflite(tmp_path_factory) -> tuple[Path, Path]:
    """(Google's uint8 quantized MobileNetV2 1.0 224, the folder converted from it)."""
    from tests.helpers import SHARED

    source = SHARED / "realdata" / "models" / REAL_TFLITE
    if not source.is_file():
        pytest.skip(f"{source} is absent: the real pretrained TFLite models are not available here")
    return source, convert(source, tmp_path_factory.mktemp("tflite") / "real")


@pytest.fixture(scope="module")
def real_tflite_verified(real_tflite) -> tuple[int, str, dict]:
    """The verification of the real quantized model: (exit code, output, parity.json)."""
    source, model = real_tflite
    return verify("--checkpoint", source, "--model", model)


def test_a_quantized_tflite_is_compared_per_layer_and_per_integer_step(real_tflite_verified):
    code, output, report = real_tflite_verified
    assert code == 0, output
    entries = {entry["endpoint"]: entry for entry in report["endpoints"]}
    floats = [e for name, e in entries.items() if name.startswith("float/")]
    integers = [e for name, e in entries.items() if name.startswith("integer/")]
    assert len(floats) == 52 and entries["logits"]["module"] == "classifier"  # every conv, the head as logits
    assert len(integers) >= 53 and "integer/mobilenet_v2.layer.3.add" in entries and "integer/softmax" in entries
    for entry in [*floats, *integers, entries["logits"]]:
        assert entry["compared"] and entry["passed"] and entry["worst_ratio"] <= 1, entry
    # Within one output step: the tolerance is that step, read off the interpreter's tensor.
    assert "one output quantization step" in report["tolerance"]
    assert all(e["max_abs_diff"] == 0 for e in integers)  # the emulation is exact
    assert entries["layer_1"]["compared"] is False and "integer model" in entries["layer_1"]["reason"]


def test_the_reports_of_a_quantized_tflite_stay_readable(real_tflite, real_tflite_verified):
    """Each reason for leaving endpoints out is said once, the plot is a screen wide, and the card names
    what was run: TFLite's interpreter, not a TensorFlow graph."""
    from PIL import Image

    _, model = real_tflite
    _, _, report = real_tflite_verified
    skipped = [entry for entry in report["endpoints"] if not entry["compared"]]
    markdown = (model / "parity" / "parity.md").read_text()
    assert len(skipped) > 30 and markdown.count(skipped[0]["reason"]) == 1
    assert all(f"`{entry['endpoint']}`" in markdown for entry in skipped)
    assert Image.open(model / "parity" / "parity.png").width <= 1600
    card = (model / "README.md").read_text()
    parity_section = card[card.index("## Parity") : card.index("## Usage")]
    assert "Lite's interpreter" in parity_section and REAL_TFLITE in parity_section
    assert "TensorFlow graph" not in card


def test_a_model_with_other_classes_than_the_reference_is_refused_in_one_line(real_tflite, tmp_path):
    """The iNat birds model (965 classes) shares the backbone of the ImageNet .tflite (1001)."""
    from tests.helpers import SHARED

    source, _ = real_tflite
    birds = SHARED / "realdata" / "models" / "mobilenet_v2_1.0_224_inat_bird_quant.tflite"
    if not birds.is_file():
        pytest.skip(f"{birds} is absent: the real iNat birds model is needed")
    model = convert(birds, tmp_path / "birds")
    code, output, _ = verify("--checkpoint", source, "--model", model, "--report-dir", tmp_path / "reports")
    assert code == 2, output
    assert "1001 classes" in output and "965" in output and "internal error" not in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "reports").exists()


def test_planted_faults_are_localised_against_a_quantized_tflite(real_tflite, tmp_path):
    """One fault in the float model (a BatchNorm bias of block 7) and one in the integer model (an int32
    bias of block 11's expansion): each is found at its own layer, and nowhere before."""
    from safetensors.numpy import load_file, save_file

    source, model = real_tflite
    folder = with_fault(model, tmp_path / "faulty")
    integers = load_file(folder / "quantized.safetensors")
    integers[INTEGER_FAULT] = integers[INTEGER_FAULT].copy()
    integers[INTEGER_FAULT][5] += 2000  # about 3 output steps at that layer's scales
    save_file(integers, folder / "quantized.safetensors")
    code, output, report = verify("--checkpoint", source, "--model", folder)
    assert code == 1, output
    assert report["first_divergence"]["endpoint"] == "float/mobilenet_v2.layer.6.reduce_1x1"
    order = [entry["endpoint"] for entry in report["endpoints"]]
    failed = [entry["endpoint"] for entry in report["endpoints"] if entry["compared"] and not entry["passed"]]
    assert [name for name in failed if name.startswith("float/")] == ["float/mobilenet_v2.layer.6.reduce_1x1"]
    first_integer = next(name for name in failed if name.startswith("integer/"))
    assert first_integer == "integer/mobilenet_v2.layer.10.expand_1x1"
    assert order.index("integer/mobilenet_v2.layer.10.conv_3x3") > order.index(first_integer)


# ----------------------------------------------------------------------------------------------- Keras
@pytest.fixture(scope="module")
def keras_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (a Keras file written by Keras itself, the folder converted from it), alpha 0.35."""
    from fixtures.keras_builder import ensure_keras_fixture

    fixture = ensure_keras_fixture(0.35)
    root = tmp_path_factory.mktemp("keras")
    return {kind: (fixture.file(kind), convert(fixture.file(kind), root / kind)) for kind in KERAS_KINDS}


KERAS_KINDS = ("keras3_archive", "tf_keras_weights")


@pytest.mark.parametrize("kind", KERAS_KINDS)
def test_keras_itself_is_the_reference_and_every_layer_is_compared(keras_files, kind):
    source, model = keras_files[kind]
    code, output, report = verify("--checkpoint", source, "--model", model)
    assert code == 0, output
    assert report["reference"]["kind"] == "keras"
    built = "load_model" if kind == "keras3_archive" else "keras.applications.MobileNetV2(alpha=0.35)"
    assert any(built in note for note in report["notes"])
    compared = [entry for entry in report["endpoints"] if entry["compared"]]
    assert len(compared) == len(report["endpoints"]) == 37  # the layer names map onto every slim endpoint
    assert all(entry["passed"] for entry in compared)
    card = (model / "README.md").read_text()
    assert "Keras" in card[card.index("## Parity") : card.index("## Usage")] and "TensorFlow graph" not in card


def test_a_planted_fault_is_localised_against_keras(keras_files, tmp_path):
    source, model = keras_files["keras3_archive"]
    code, output, report = verify("--checkpoint", source, "--model", with_fault(model, tmp_path / "faulty"))
    assert code == 1, output
    assert report["first_divergence"]["endpoint"] == "layer_9"
    assert all(entry["passed"] for entry in report["endpoints"] if entry["endpoint"] in ("layer_1", "layer_8"))


def test_a_keras_file_with_a_lambda_layer_is_refused(keras_files, tmp_path):
    import zipfile

    source, model = keras_files["keras3_archive"]
    hostile = tmp_path / "lambda.keras"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(hostile, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                relu = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "ReLU")
                relu["class_name"] = "Lambda"
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    code, output, _ = verify("--checkpoint", hostile, "--model", model, "--report-dir", tmp_path / "reports")
    assert code == 2, output
    assert "Lambda" in output and "refusing lambda.keras" in output


def test_a_fine_tuned_keras_model_with_its_own_input_rescaling_passes(tmp_path):
    """The transfer-learning recipe: augmentation, Rescaling(1 / 127.5, -1), a nested base, a 5-class Dense
    head. Keras gets the images before its Rescaling; the nested base is compared through its outputs."""
    from fixtures.keras_builder import FINE_TUNED_ALPHA, ensure_keras_fixture

    source = ensure_keras_fixture(FINE_TUNED_ALPHA).file("fine_tuned_archive")
    model = convert(source, tmp_path / "fine_tuned")
    code, output, report = verify("--checkpoint", source, "--model", model)
    assert code == 0, output
    assert any("rescales its input" in note for note in report["notes"])
    entries = {entry["endpoint"]: entry for entry in report["endpoints"]}
    assert entries["logits"]["compared"] and entries["logits"]["passed"]
    assert entries["global_pool"]["compared"] and entries["global_pool"]["passed"]
    assert "nested base" in entries["layer_1"]["reason"]


def test_an_untrained_keras_model_passes_as_a_weak_check_and_is_drawn_as_a_pass(tmp_path):
    """Keras' MobileNetV2 with weights=None: its logits are ~1e-10 for activations ~1. The check passes,
    says it is weak (verdict, parity.md, card), and parity.png draws every difference within its tolerance."""
    keras = pytest.importorskip("keras")
    from converter.verify.report import plot_series

    source = tmp_path / "untrained.keras"
    keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None).save(source)
    model = convert(source, tmp_path / "untrained")
    code, output, report = verify("--checkpoint", source, "--model", model)
    assert code == 0, output
    assert "Weak check" in output and report["weak_signal"]
    assert "Weak check" in (model / "parity" / "parity.md").read_text()
    assert "**A weak check**" in (model / "README.md").read_text()
    logits = next(entry for entry in report["endpoints"] if entry["endpoint"] == "logits")
    assert logits["tolerance"] < 1e-12  # below the floor parity.png once drew the differences at
    from converter.verify.compare import verify_model

    for series in plot_series(verify_model(source, model)):
        assert all(d <= t for d, t in zip(series.diffs, series.tolerances, strict=True)), series
