"""Teachable Machine's TFLite exports convert with no flag beyond ``--checkpoint``, the head of two Dense layers
included, and compute what the producing framework computes on the real photos.

The files: Teachable Machine's Keras model (a Sequential of Sequentials: base + pooling, then Dense(100, relu) ->
Dense(3, softmax, no bias); the Keras producer fixture, ``fixtures/keras_builder.py``) converted by TF's
``TFLiteConverter.from_keras_model`` as float32 (``model_unquant.tflite``), float16, dynamic range, int8 and uint8
(``model.tflite``), at depth 0.35 / 97x97 and 0.5 / 96x96. Truth: Keras' own outputs (``references.npz``) and
TFLite's interpreter, its reference kernels for the integer files. Bars (issue #22): float max |ours - ref| /
max |ref| <= 1e-4; dynamic range: the same top-1 on every image; full integer: every step of the integer model
within one output step on >= 99% of its values, the same top-1. Then the exports as Teachable Machine downloads
them: a ``.zip`` of the model (``.tflite``, ``keras_model.h5``, or ``model.savedmodel/`` saved by tf_keras) and
``labels.txt``.

Run with ``-rA -s`` to see the measured differences (``docs/producers.md`` holds the matrix).
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from fixtures.keras_builder import PRODUCER_CLASSES, REAL_IMAGES, TM_HIDDEN_UNITS, ensure_producer_fixture
from mobilenet_torch import MobileNetV2Config, load_pretrained
from mobilenet_torch.quantized import QuantizedMobileNetV2
from tests.helpers import assert_one_line_error, run_cli

pytest.importorskip("tensorflow", reason="TensorFlow's TFLite converter makes the files and runs them")
pytest.importorskip("tf_keras", reason="tf_keras makes half of the files")
if not REAL_IMAGES.is_dir():
    pytest.skip(f"{REAL_IMAGES} is absent: the files are checked on real images", allow_module_level=True)

from fixtures.keras_tflite_builder import build_teachable_machine_tflite, teachable_machine_keras_file  # noqa: E402
from tests.realdata_tflite import interpreter  # noqa: E402

FLOAT_BAR = 1e-4
INTEGER_WITHIN_ONE = 0.99
TM_LABELS = tuple(f"Class {i + 1}" for i in range(PRODUCER_CLASSES))
# (producer, depth, size, mode): both producers, both sizes (one odd), every scheme.
CASES = [
    ("keras", 0.35, 97, "float"),
    ("tf_keras", 0.5, 96, "float"),
    ("keras", 0.35, 97, "float16"),
    ("tf_keras", 0.5, 96, "dynamic"),
    ("keras", 0.35, 97, "int8"),
    ("tf_keras", 0.5, 96, "uint8"),
]
FIXTURE_PRODUCER = {"keras": "keras3", "tf_keras": "tf_keras"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> (the .tflite, the folder converted from it), each converted once."""
    done = {}

    def convert(case):
        if case not in done:
            path = build_teachable_machine_tflite(*case)
            folder = tmp_path_factory.mktemp("tm") / "model"
            convert_checkpoint(path, folder)
            done[case] = path, folder
        return done[case]

    return convert


def references(producer: str, depth: float, size: int) -> dict[str, np.ndarray]:
    """The photos as Teachable Machine feeds them (NHWC, x / 127.5 - 1) and Keras' outputs on them."""
    refs = ensure_producer_fixture(depth, size).references()
    key = f"{FIXTURE_PRODUCER[producer]}_teachable_machine"
    return {"images": refs["images"], "logits": refs[f"{key}_logits"], "outputs": refs[f"{key}_outputs"]}


def run_file(path, images: np.ndarray, tensors: tuple[int, ...] = ()) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The file's output on each image and the values of `tensors`, by TFLite's reference kernels; an integer
    input is quantized as TFLite's QUANTIZE does (round half away from zero)."""
    interp = interpreter(path, preserve_all_tensors=True, reference_kernels=True)
    detail = interp.get_input_details()[0]
    outputs, values = [], {tensor: [] for tensor in tensors}
    for image in images:
        value = image[None].astype(np.float32)
        if detail["dtype"] != np.float32:
            scale, zero_point = detail["quantization"]
            quotient = value / np.float32(scale)
            rounded = np.sign(quotient) * np.floor(np.abs(quotient) + 0.5) + zero_point
            limits = np.iinfo(detail["dtype"])
            value = np.clip(rounded, limits.min, limits.max).astype(detail["dtype"])
        interp.set_tensor(detail["index"], value)
        interp.invoke()
        outputs.append(interp.get_tensor(interp.get_output_details()[0]["index"])[0].copy())
        for tensor in tensors:
            values[tensor].append(interp.get_tensor(tensor).copy())
    return np.stack(outputs), {tensor: np.concatenate(found) for tensor, found in values.items()}


def ours(folder, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of the converted float model."""
    model = load_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).logits
    return logits.numpy(), torch.softmax(logits, -1).numpy()


def relative(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("case", [case for case in CASES if case[3] == "float"])
def test_float_file_matches_keras_and_the_interpreter(converted, case):
    path, folder = converted(case)
    config = MobileNetV2Config.from_pretrained(folder)
    assert config.classifier_layers == [{"units": TM_HIDDEN_UNITS, "activation": "relu"}]
    refs = references(*case[:3])
    logits, probabilities = ours(folder, refs["images"])
    theirs, _ = run_file(path, refs["images"])
    differences = {
        "Keras' logits": relative(logits, refs["logits"]),
        "Keras' probabilities": relative(probabilities, refs["outputs"]),
        "the interpreter's probabilities": relative(probabilities, theirs),
    }
    print(f"\nTeachable Machine {case}: " + ", ".join(f"{v:.1e} of {k}" for k, v in differences.items()))
    assert max(differences.values()) <= FLOAT_BAR
    assert (probabilities.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("case", [case for case in CASES if case[3] in ("float16", "dynamic")])
def test_float16_and_dynamic_range_files_match_the_interpreter(converted, case):
    path, folder = converted(case)
    images = references(*case[:3])["images"]
    _, probabilities = ours(folder, images)
    theirs, _ = run_file(path, images)
    difference = relative(probabilities, theirs)
    print(f"\nTeachable Machine {case}: {difference:.1e} of the interpreter's probabilities, top-1 equal")
    assert (probabilities.argmax(-1) == theirs.argmax(-1)).all()
    if case[3] == "float16":
        assert difference <= FLOAT_BAR


@pytest.mark.parametrize("case", [case for case in CASES if case[3] in ("int8", "uint8")])
def test_integer_model_runs_the_hidden_dense_layer_step_by_step(converted, case):
    path, folder = converted(case)
    model = QuantizedMobileNetV2.from_pretrained(folder)
    images = references(*case[:3])["images"]
    steps = model.run(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert "classifier_hidden.0" in steps and model.records["classifier_hidden.0"]["activation"] == "relu"
    compared = {name: record["tensor"] for name, record in model.records.items() if name in steps}
    outputs, theirs = run_file(path, images, tuple(compared.values()))
    shares = {}
    for name, tensor in compared.items():
        values = steps[name].values.numpy()
        values = (values.transpose(0, 2, 3, 1) if values.ndim == 4 else values).reshape(theirs[tensor].shape)
        shares[name] = float((np.abs(values - theirs[tensor].astype(np.int64)) <= 1).mean())
    worst = min(shares, key=shares.get)
    print(f"\nTeachable Machine {case}: every step within one step on >= {shares[worst]:.4%} ({worst})")
    assert shares[worst] >= INTEGER_WITHIN_ONE
    assert shares["classifier_hidden.0"] >= INTEGER_WITHIN_ONE and shares["softmax"] >= INTEGER_WITHIN_ONE
    probabilities = steps["softmax"].values.numpy().reshape(len(images), -1)
    assert (probabilities.argmax(-1) == outputs.reshape(len(images), -1).argmax(-1)).all()


@pytest.mark.parametrize("case", [CASES[0], CASES[4]])
def test_verify_passes(converted, case):
    from converter.verify import verify_model

    path, folder = converted(case)
    result = verify_model(path, folder)
    assert result.passed, result.first_divergence
    compared = {row.endpoint for row in result.compared_rows}
    assert "logits" in compared
    if case[3] == "int8":
        assert {"float/classifier_hidden.0", "integer/classifier_hidden.0"} <= compared


def export_zip(tmp_path, name: str, files: dict[str, bytes]):
    """A Teachable Machine download: the model and labels.txt at the zip's root."""
    archive = tmp_path / name
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for member, data in files.items():
            zipped.writestr(member, data)
    return archive


def labels_file() -> bytes:
    return teachable_machine_keras_file("keras", 0.35, 97).with_name("labels.txt").read_bytes()


@pytest.mark.parametrize(
    ("download", "model_name", "source"),
    [
        ("converted_tflite.zip", "model_unquant.tflite", ("keras", 0.35, 97, "float")),
        ("converted_tflite.zip", "model.tflite", ("keras", 0.35, 97, "int8")),
        ("converted_keras.zip", "keras_model.h5", None),
    ],
)
def test_downloaded_zip_converts_with_its_labels(tmp_path, download, model_name, source):
    model = build_teachable_machine_tflite(*source) if source else teachable_machine_keras_file("tf_keras", 0.35, 97)
    archive = export_zip(tmp_path, download, {model_name: model.read_bytes(), "labels.txt": labels_file()})
    result = run_cli("--checkpoint", archive, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert tuple(config["id2label"][str(i)] for i in range(PRODUCER_CLASSES)) == TM_LABELS
    assert config["classifier_layers"] == [{"units": TM_HIDDEN_UNITS, "activation": "relu"}]
    preprocessor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 97}


def test_tflite_in_a_folder_takes_labels_txt(tmp_path):
    folder = tmp_path / "converted_tflite"
    folder.mkdir()
    (folder / "model_unquant.tflite").write_bytes(build_teachable_machine_tflite("keras", 0.35, 97).read_bytes())
    (folder / "labels.txt").write_bytes(labels_file())
    summary = convert_checkpoint(folder, tmp_path / "out")
    assert any("read from labels.txt next to the model" in note for note in summary.notes)
    config = MobileNetV2Config.from_pretrained(tmp_path / "out")
    assert tuple(config.id2label[i] for i in range(PRODUCER_CLASSES)) == TM_LABELS


def test_a_zip_that_escapes_is_refused_before_anything_is_written(tmp_path):
    model = build_teachable_machine_tflite("keras", 0.35, 97).read_bytes()
    archive = export_zip(tmp_path, "converted_tflite.zip", {"model_unquant.tflite": model, "../labels.txt": b"0 a"})
    result = run_cli("--checkpoint", archive, "--output", tmp_path / "out")
    assert_one_line_error(result, result.returncode, "'../labels.txt' would escape")
    assert result.returncode != 0 and not (tmp_path / "out").exists() and not (tmp_path.parent / "labels.txt").exists()


@pytest.fixture(scope="module")
def savedmodel_export(tmp_path_factory):
    """Teachable Machine's converted_savedmodel.zip: its Keras model saved by tf_keras as a SavedModel
    (``model.savedmodel/``), with labels.txt beside it."""
    import tf_keras

    root = tmp_path_factory.mktemp("savedmodel_export")
    model = tf_keras.models.load_model(teachable_machine_keras_file("tf_keras", 0.35, 97))
    model.save(root / "model.savedmodel", save_format="tf")
    (root / "labels.txt").write_bytes(labels_file())
    return root


def test_downloaded_savedmodel_zip_converts_with_its_labels_and_verifies(tmp_path, savedmodel_export):
    from converter.verify import verify_model

    archive = tmp_path / "converted_savedmodel.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for file in sorted(savedmodel_export.rglob("*")):
            zipped.write(file, file.relative_to(savedmodel_export).as_posix())
    result = run_cli("--checkpoint", archive, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = MobileNetV2Config.from_pretrained(tmp_path / "out")
    assert tuple(config.id2label[i] for i in range(PRODUCER_CLASSES)) == TM_LABELS
    assert config.classifier_layers == [{"units": TM_HIDDEN_UNITS, "activation": "relu"}] and config.image_size == 97
    refs = references("tf_keras", 0.35, 97)
    logits, _ = ours(tmp_path / "out", refs["images"])
    difference = relative(logits, refs["logits"])
    print(f"\nTeachable Machine converted_savedmodel.zip: {difference:.1e} of Keras' logits")
    assert difference <= FLOAT_BAR
    parity = verify_model(archive, tmp_path / "out")
    assert parity.passed, parity.first_divergence


def edited_head(tmp_path, activation: str):
    """The float file with the hidden Dense layer's fused activation made `activation` (a TFLite enum name)."""
    from tests.tflite_editing import TFLiteEditor, schema

    editor = TFLiteEditor(build_teachable_machine_tflite("keras", 0.35, 97).read_bytes())
    hidden = editor.convs("FULLY_CONNECTED")[0]
    hidden.builtinOptions.fusedActivationFunction = getattr(schema().ActivationFunctionType, activation)
    path = tmp_path / "edited.tflite"
    path.write_bytes(editor.to_bytes())
    return path


def test_a_linear_hidden_layer_converts(tmp_path):
    path = edited_head(tmp_path, "NONE")
    convert_checkpoint(path, tmp_path / "out")
    config = MobileNetV2Config.from_pretrained(tmp_path / "out")
    assert config.classifier_layers == [{"units": TM_HIDDEN_UNITS, "activation": "linear"}]
    images = references("keras", 0.35, 97)["images"]
    _, probabilities = ours(tmp_path / "out", images)
    theirs, _ = run_file(path, images)
    assert relative(probabilities, theirs) <= FLOAT_BAR


def test_a_hidden_layer_with_another_activation_is_refused(tmp_path):
    result = run_cli("--checkpoint", edited_head(tmp_path, "RELU6"), "--output", tmp_path / "out")
    assert_one_line_error(result, result.returncode, "MobilenetV2/Logits/Dense_0", "relu6, expected relu or None")
    assert result.returncode != 0 and not (tmp_path / "out").exists()
