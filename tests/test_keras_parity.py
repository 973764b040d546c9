"""Keras files of every kind convert to folders whose models reproduce Keras' own outputs (computed by
Keras when the fixtures were built) at the native, an odd and a non-square size, in mobilenet_torch and
in transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.output.records import ConversionRecord
from converter.slim import class_names
from converter.vocabulary import CLASSIFICATION
from fixtures.keras_builder import ALPHAS, FINE_TUNED_ALPHA, FINE_TUNED_CLASSES, IMAGENET_KINDS, ensure_keras_fixture
from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2Model
from tests.helpers import logit_tolerance, to_torch

pytest.importorskip("keras")  # Keras builds the fixtures and computes the outputs compared against
pytest.importorskip("tf_keras")

SIZES = ("native", "odd", "non_square")
IMAGENET_LABELS = class_names(CLASSIFICATION, 1001)[1:]  # Keras' head has no background class


def convert(path, tmp_path):
    folder = tmp_path / "model"
    convert_checkpoint(path, folder)
    return folder, ConversionRecord.read(folder)


def labels(model) -> list[str]:
    id2label = {int(i): name for i, name in model.config.id2label.items()}
    return [id2label[i] for i in range(len(id2label))]


def logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(to_torch(images)).logits.numpy()


def assert_close(ours: np.ndarray, theirs: np.ndarray, what) -> float:
    assert ours.shape == theirs.shape, what
    difference = float(np.abs(ours - theirs).max())
    assert difference <= logit_tolerance(theirs), (what, difference)
    # The outputs depend on the input: a constant model would not prove anything.
    assert len(theirs) == 1 or float(np.abs(theirs - theirs.mean(axis=0)).max()) > 100 * logit_tolerance(theirs)
    return difference


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", IMAGENET_KINDS)
def test_imagenet_files_equal_keras(kind, alpha, tmp_path):
    fixture = ensure_keras_fixture(alpha)
    refs = fixture.references()
    folder, record = convert(fixture.file(kind), tmp_path)
    assert record.source["format"] == "keras" and record.weights == "raw"
    assert (record.variant["depth"], record.variant["num_labels"]) == (alpha, 1000)
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    assert labels(model) == IMAGENET_LABELS
    for size in SIZES:
        assert_close(logits(model, refs[f"images_{size}"]), refs[f"logits_{size}"], (kind, size))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_no_top_file_gives_a_backbone_with_keras_features(alpha, tmp_path):
    fixture = ensure_keras_fixture(alpha)
    refs = fixture.references()
    folder, record = convert(fixture.file("tf_keras_no_top"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MobileNetV2Model"] and record.variant["size"] == fixture.size
    model = MobileNetV2Model.from_pretrained(folder).eval()
    for size in SIZES:
        with torch.no_grad():
            ours = model(to_torch(refs[f"images_{size}"])).last_hidden_state.numpy().transpose(0, 2, 3, 1)
        assert_close(ours, refs[f"features_{size}"], size)


@pytest.mark.parametrize("kind", ["fine_tuned_archive", "fine_tuned_tf_keras"])
def test_fine_tuned_model_with_rescaling_equals_keras(kind, tmp_path):
    fixture = ensure_keras_fixture(FINE_TUNED_ALPHA)
    refs = fixture.references()
    folder, record = convert(fixture.file(kind), tmp_path)
    assert record.variant["size"] == fixture.size
    assert any("Rescaling" in note for note in record.notes) and any("RandomFlip" in note for note in record.notes)
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    assert labels(model) == [f"LABEL_{i}" for i in range(FINE_TUNED_CLASSES)]
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    for size in SIZES:
        # The Keras model takes pixels in [0, 255] and rescales them itself; the folder's preprocessor does.
        pixels = (refs[f"images_{size}"] + 1) * 127.5
        mean, std = np.asarray(processor["image_mean"]), np.asarray(processor["image_std"])
        rescaled = ((pixels * processor["rescale_factor"] - mean) / std).astype(np.float32)
        assert_close(logits(model, rescaled), refs[f"fine_tuned_{size}"], size)


@pytest.mark.parametrize("kind", ["sequential_archive", "sequential_weights"])
def test_sequential_wrapper_equals_keras(kind, tmp_path):
    fixture = ensure_keras_fixture(FINE_TUNED_ALPHA)
    refs = fixture.references()
    folder, _ = convert(fixture.file(kind), tmp_path)
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    assert model.config.num_labels == FINE_TUNED_CLASSES
    assert_close(logits(model, refs["images_native"]), refs["sequential_native"], kind)


def test_dynamic_input_model_pads_as_keras_at_even_and_odd_sizes(tmp_path):
    """Keras pads (0, 1) at every size when the input size is open; so does the converted model."""
    fixture = ensure_keras_fixture(FINE_TUNED_ALPHA)
    refs = fixture.references()
    folder, record = convert(fixture.file("dynamic_archive"), tmp_path / "dynamic")
    assert any("input_shape=None" in note for note in record.notes)
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    assert "bottom_right" in model.config.strided_padding
    assert_close(logits(model, refs["images_native"]), refs["dynamic_native"], "even size")
    assert_close(logits(model, refs["images_odd"]), refs["dynamic_odd"], "odd size")
    # ... where the fixed-size Keras model, which pads like SAME, computes something else.
    difference = np.abs(refs["fine_tuned_odd"] - refs["dynamic_odd"]).max()
    assert difference > 100 * logit_tolerance(refs["dynamic_odd"])


@pytest.mark.parametrize("alpha", ALPHAS)
def test_transformers_loads_the_folders_with_keras_outputs(alpha, tmp_path):
    transformers = pytest.importorskip("transformers")
    fixture = ensure_keras_fixture(alpha)
    refs = fixture.references()
    classifier, _ = convert(fixture.file("keras3_archive"), tmp_path / "classifier")
    backbone, _ = convert(fixture.file("tf_keras_no_top"), tmp_path / "backbone")
    theirs, info = transformers.MobileNetV2ForImageClassification.from_pretrained(classifier, output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    features, info = transformers.MobileNetV2Model.from_pretrained(backbone, output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for size in SIZES:
        images = to_torch(refs[f"images_{size}"])
        with torch.no_grad():
            assert_close(theirs.eval()(images).logits.numpy(), refs[f"logits_{size}"], size)
            hidden = features.eval()(images).last_hidden_state.numpy().transpose(0, 2, 3, 1)
        assert_close(hidden, refs[f"features_{size}"], size)
