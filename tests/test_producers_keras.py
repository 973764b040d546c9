"""Keras files as each producer writes them convert, with no flag, to folders that reproduce Keras' own
predictions on real images: Keras 3 and tf_keras, keras.applications.MobileNetV2 with and without top,
the transfer recipe and Teachable Machine's Sequential of Sequentials, as .h5 and .keras, at two depths
and two sizes (one odd). A head transformers cannot hold still loads there as the backbone, with the
same outputs as ours (transformers is the independent truth for that)."""

from __future__ import annotations

import itertools
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.errors import KerasHeadError
from converter.output.records import ConversionRecord
from fixtures.keras_builder import (
    PRODUCER_CLASSES,
    PRODUCER_FORMATS,
    PRODUCER_GRID,
    PRODUCER_MODELS,
    PRODUCERS,
    REAL_IMAGES,
    TM_HIDDEN_UNITS,
    ensure_producer_fixture,
)
from mobilenet_torch import MobileNetV2Config, UnsupportedConfigError, load_pretrained

pytest.importorskip("keras")  # Keras builds the fixtures and computes the outputs compared against
pytest.importorskip("tf_keras")
if not REAL_IMAGES.is_dir():
    pytest.skip(
        f"{REAL_IMAGES} is absent: the real images (../shared/realdata) are not available", allow_module_level=True
    )

RELATIVE_TOLERANCE = 1e-4  # max |ours - Keras| / max |Keras|
CASES = [
    (alpha, size, producer, model, fmt)
    for alpha, size, models in PRODUCER_GRID
    for producer in PRODUCERS
    for model in models
    for fmt in PRODUCER_FORMATS
]
TM = (0.35, 224)  # Teachable Machine's own depth and size
VERIFIED = (0.35, 97)  # the verifier runs on every file of one depth and size
TM_LABELS = tuple(f"Class {i + 1}" for i in range(PRODUCER_CLASSES))


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def run(folder, images: np.ndarray):
    model = load_pretrained(folder).eval()
    with torch.no_grad():
        return model, model(torch.from_numpy(images).permute(0, 3, 1, 2))


@pytest.mark.parametrize(("alpha", "size", "producer", "model", "fmt"), CASES)
def test_producer_file_equals_keras_on_real_images(alpha, size, producer, model, fmt, tmp_path):
    fixture = ensure_producer_fixture(alpha, size)
    refs = fixture.references()
    summary = convert_checkpoint(fixture.file(producer, model, fmt), tmp_path / "model")
    assert (summary.variant.depth, summary.variant.size) == (alpha, size)
    ours, outputs = run(tmp_path / "model", refs["images"])
    key = f"{producer}_{model}"
    if model == "no_top":  # a backbone folder, without --backbone-only
        assert type(ours).__name__ == "MobileNetV2Model"
        reference = refs[f"{key}_outputs"]
        features = outputs.last_hidden_state if reference.ndim == 4 else outputs.pooler_output.flatten(1)
        found = features.permute(0, 2, 3, 1).numpy() if reference.ndim == 4 else features.numpy()
    else:
        found, reference = outputs.logits.numpy(), refs[f"{key}_logits"]
        # The softmax the saved model ends in (top, Teachable Machine) is noted; ours returns logits.
        ends_in_softmax = model in ("top", "teachable_machine")
        assert any("softmax" in note for note in summary.notes) == ends_in_softmax
        if ends_in_softmax:
            probabilities = torch.from_numpy(found).softmax(-1).numpy()
            assert np.abs(probabilities - refs[f"{key}_outputs"]).max() <= 1e-5
    assert relative_difference(found, reference) <= RELATIVE_TOLERANCE
    # The outputs depend on the image: a constant model would prove nothing.
    assert np.abs(reference - reference.mean(axis=0)).max() > 1e-2 * np.abs(reference).max()
    if model == "teachable_machine":
        assert ours.config.classifier_layers == [{"units": TM_HIDDEN_UNITS, "activation": "relu"}]
        assert tuple(ours.config.id2label[i] for i in range(PRODUCER_CLASSES)) == TM_LABELS
        assert any("zero bias" in note for note in summary.notes)


@pytest.fixture(scope="module")
def teachable_machine():
    return ensure_producer_fixture(*TM)


def test_teachable_machine_folder_loads_in_transformers_as_the_backbone(teachable_machine, tmp_path):
    transformers = pytest.importorskip("transformers")
    refs = teachable_machine.references()
    folder = tmp_path / "model"
    summary = convert_checkpoint(teachable_machine.file("tf_keras", "teachable_machine", "h5"), folder)
    assert any("MobileNetV2Model (the backbone) only" in note for note in summary.notes)
    card = (folder / "README.md").read_text()
    assert "loads this folder as `MobileNetV2Model`" in card
    assert "the center square of the image, resized to 224x224, RGB scaled as x / 127.5 - 1" in card
    assert "named by the source (`Class 1`, `Class 2`, `Class 3`)" in card

    pixels = torch.from_numpy(refs["images"]).permute(0, 3, 1, 2)
    ours = load_pretrained(folder).eval()
    theirs = transformers.MobileNetV2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        expected, backbone = theirs(pixels), ours.mobilenet_v2(pixels)
        logits = ours(pixels).logits.numpy()
    assert relative_difference(backbone.last_hidden_state.numpy(), expected.last_hidden_state.numpy()) <= 1e-5
    assert relative_difference(backbone.pooler_output.numpy(), expected.pooler_output.numpy()) <= 1e-5
    assert relative_difference(logits, refs["tf_keras_teachable_machine_logits"]) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("container", ["folder", "tar.gz", "zip"])
def test_teachable_machine_labels_next_to_the_model(container, teachable_machine, tmp_path):
    export = teachable_machine.file("keras3", "teachable_machine", "h5").parent
    if container == "folder":
        source = export
    elif container == "zip":  # converted_keras.zip as Teachable Machine downloads it: both files at the root
        source = tmp_path / "converted_keras.zip"
        with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(export.iterdir()):
                archive.write(file, file.name)
    else:
        source = tmp_path / "converted_keras.tar.gz"
        with tarfile.open(source, "w:gz") as archive:
            archive.add(export, arcname="converted_keras")
    convert_checkpoint(source, tmp_path / "model")
    config = MobileNetV2Config.from_pretrained(tmp_path / "model")
    assert tuple(config.id2label[i] for i in range(PRODUCER_CLASSES)) == TM_LABELS


def test_labels_file_naming_other_classes_is_noted_not_used(teachable_machine, tmp_path):
    export = shutil.copytree(teachable_machine.file("keras3", "teachable_machine", "keras").parent, tmp_path / "tm")
    (export / "labels.txt").write_text("0 cat\n1 dog\n")
    summary = convert_checkpoint(export / "keras_model.keras", tmp_path / "model")
    assert any("labels.txt next to the model was not used" in note for note in summary.notes)
    assert MobileNetV2Config.from_pretrained(tmp_path / "model").id2label[0] == "LABEL_0"


def test_weights_only_file_with_several_dense_layers_is_refused(teachable_machine, tmp_path):
    """A .keras archive's model.weights.h5 is Keras 3's weights-only file: without the config, whether the
    hidden Dense layer applies a ReLU is unknown."""
    with zipfile.ZipFile(teachable_machine.file("keras3", "teachable_machine", "keras")) as archive:
        weights = tmp_path / "model.weights.h5"
        weights.write_bytes(archive.read("model.weights.h5"))
    with pytest.raises(KerasHeadError, match="2 Dense layers.*activations are unknown.*--backbone-only"):
        convert_checkpoint(weights, tmp_path / "model")
    summary = convert_checkpoint(weights, tmp_path / "backbone", backbone_only=True)
    assert summary.variant.kind == "backbone"
    assert ConversionRecord.read(tmp_path / "backbone").variant["kind"] == "backbone"


@pytest.mark.parametrize(
    "layers",
    [
        [{"units": 100, "activation": "gelu"}],
        [{"units": 0, "activation": "relu"}],
        [{"units": 100}],
        [{"units": 100, "activation": "relu", "bias": False}],
        {"units": 100, "activation": "relu"},
    ],
)
def test_classifier_layers_it_cannot_compute_are_refused(layers):
    with pytest.raises(UnsupportedConfigError, match="classifier_layers"):
        MobileNetV2Config(classifier_layers=layers)


@pytest.mark.parametrize(
    ("producer", "model", "fmt"),
    [
        (producer, model, fmt)
        for producer in PRODUCERS
        for model, fmt in itertools.product(PRODUCER_MODELS, PRODUCER_FORMATS)
    ],
)
def test_verify_passes_against_keras_own_model(producer, model, fmt, tmp_path):
    """The verifier runs Keras' own model from the file (tf_keras for the files tf.keras wrote) and compares
    every endpoint it can reach: the logits inside Teachable Machine's nested head, the features of a
    no-top model (which has no logits)."""
    from converter.verify import verify_model

    fixture = ensure_producer_fixture(*VERIFIED)
    source = fixture.file(producer, model, fmt)
    convert_checkpoint(source, tmp_path / "model")
    result = verify_model(source, tmp_path / "model")
    assert result.passed, result.first_divergence
    compared = {row.endpoint for row in result.compared_rows}
    if model == "no_top":
        assert "logits" not in compared and "layer_19" in compared
    else:
        assert "logits" in compared


def test_state_shapes_of_a_hidden_head_equal_the_models_state_dict():
    """The torch-free shapes the converter checks against are the model's own."""
    from mobilenet_torch import MobileNetV2ForImageClassification
    from mobilenet_torch.architecture import state_shapes

    config = MobileNetV2Config(
        depth_multiplier=0.35,
        num_labels=PRODUCER_CLASSES,
        classifier_layers=[{"units": TM_HIDDEN_UNITS, "activation": "relu"}, {"units": 7, "activation": "linear"}],
    )
    model = MobileNetV2ForImageClassification(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert state_shapes(config, "MobileNetV2ForImageClassification") == shapes
    assert shapes["classifier_hidden.1.weight"] == (7, TM_HIDDEN_UNITS) and shapes["classifier.weight"] == (3, 7)
