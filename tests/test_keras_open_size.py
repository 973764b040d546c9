"""Keras MobileNetV2 built for inputs of any size (`input_shape=None`): Keras pads its strided depthwise convs
((0, 1), (0, 1)) at every size, where TF's SAME pads (1, 1) on odd maps. The converted model pads as Keras
does (config `strided_padding`), so it gives Keras' own outputs at odd, even and non-square sizes; in
transformers, which ignores the field, the folder still loads and computes TF's SAME, the same only where
those convs' inputs are even (as the conversion and the card say)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from mobilenet_torch import MobileNetV2Config, load_pretrained
from mobilenet_torch.architecture import pads_as_same

pytest.importorskip("keras")  # Keras builds the models and computes the outputs compared against
pytest.importorskip("tf_keras")

from fixtures.keras_builder import _images  # noqa: E402
from fixtures.keras_open_size import (  # noqa: E402 (Keras is needed to build the fixtures)
    OPEN_SIZE_INPUTS,
    OPEN_SIZE_MODELS,
    OPEN_SIZE_PRODUCERS,
    open_size_model,
    write_open_size_model,
)

RELATIVE_TOLERANCE = 1e-4  # max |ours - Keras| / max |Keras|
KERAS_OPEN_PADDING = ["same", "bottom_right", "bottom_right", "bottom_right", "bottom_right"]  # stem: "same"
CASES = [(producer, model) for producer in OPEN_SIZE_PRODUCERS for model in OPEN_SIZE_MODELS]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(producer, model) -> (the Keras model's file and outputs, the folder converted from it with no option)."""
    root, cache = tmp_path_factory.mktemp("keras_open_size"), {}

    def get(producer: str, model: str):
        if (producer, model) not in cache:
            built = write_open_size_model(producer, model, root / "sources")
            folder = root / f"{producer}_{model}"
            summary = convert_checkpoint(built.path, folder)
            cache[producer, model] = built, folder, summary
        return cache[producer, model]

    return get


def outputs(model, images: np.ndarray) -> np.ndarray:
    """Logits, or the last feature map as Keras returns it (NHWC)."""
    with torch.no_grad():
        result = model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2))
    return result.logits.numpy() if hasattr(result, "logits") else result.last_hidden_state.permute(0, 2, 3, 1).numpy()


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize(("producer", "model"), CASES)
def test_an_open_size_keras_model_converts_to_keras_outputs_at_odd_and_even_sizes(converted, producer, model):
    built, folder, summary = converted(producer, model)
    config = json.loads((folder / "config.json").read_text())
    assert config["strided_padding"] == KERAS_OPEN_PADDING and config["tf_padding"] is True
    ours = load_pretrained(folder)
    for images, reference in zip(built.images, built.outputs, strict=True):
        assert relative_difference(outputs(ours, images), reference) <= RELATIVE_TOLERANCE, images.shape
        # The outputs depend on the image: a constant model would prove nothing.
        assert np.abs(reference[0] - reference[1]).max() > 1e-2 * np.abs(reference).max()
    assert any("input_shape=None" in note for note in summary.notes)


def test_same_padding_would_differ_from_keras_at_odd_sizes(converted):
    """The property is needed: the same weights with TF's SAME everywhere miss Keras' outputs on odd maps."""
    built, folder, _ = converted("keras3", "transfer")
    same = load_pretrained(folder, strided_padding=None)
    for (height, width), images, reference in zip(OPEN_SIZE_INPUTS, built.images, built.outputs, strict=True):
        difference = relative_difference(outputs(same, images), reference)
        if height % 2 or width % 2:
            assert difference > 100 * RELATIVE_TOLERANCE, (height, width)
        else:
            assert difference <= RELATIVE_TOLERANCE


def test_transformers_loads_the_folder_and_matches_keras_only_where_its_same_padding_agrees(converted):
    transformers = pytest.importorskip("transformers")
    built, folder, summary = converted("tf_keras", "transfer")
    note = next(note for note in summary.notes if "strided_padding" in note)
    assert "transformers ignores that field" in note and "true at the image size 224" in note
    assert "transformers ignores that field" in (folder / "README.md").read_text()
    theirs, info = transformers.MobileNetV2ForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = MobileNetV2Config.from_pretrained(folder)
    for (height, width), images, reference in zip(OPEN_SIZE_INPUTS, built.images, built.outputs, strict=True):
        difference = relative_difference(outputs(theirs, images), reference)
        if pads_as_same(config, height, width):
            assert difference <= RELATIVE_TOLERANCE, (height, width)
        else:
            assert difference > 100 * RELATIVE_TOLERANCE, (height, width)
    assert pads_as_same(config, 96, 96) and not pads_as_same(config, 97, 97)


@pytest.mark.parametrize("producer", list(OPEN_SIZE_PRODUCERS))
def test_verify_runs_the_open_size_keras_model_at_odd_sizes_too_and_passes(converted, producer):
    from click.testing import CliRunner

    from converter.app.cli import verify_main

    built, folder, _ = converted(producer, "no_top")
    result = CliRunner().invoke(verify_main, ["--checkpoint", str(built.path), "--model", str(folder)])
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "parity" / "parity.json").read_text())
    assert any(size % 2 for entry in report["inputs"] for size in entry["shape"][2:])  # an odd side
    compared = {entry["endpoint"] for entry in report["endpoints"] if entry.get("compared")}
    assert {"layer_1", "layer_4", "layer_19"} <= compared  # past the stem and every strided block


def test_a_tf_keras_saved_model_of_an_open_size_model_pads_as_keras(tmp_path):
    """tf_keras writes the model config into the SavedModel (keras_metadata.pb): the padding is read there."""
    built = open_size_model("tf_keras", "transfer")
    built.save(tmp_path / "saved_model")  # no suffix: tf_keras writes a SavedModel
    folder = tmp_path / "converted"
    convert_checkpoint(tmp_path / "saved_model", folder)
    assert json.loads((folder / "config.json").read_text())["strided_padding"] == KERAS_OPEN_PADDING
    model = load_pretrained(folder)
    for shape in OPEN_SIZE_INPUTS:
        images = _images(shape, 2, seed=sum(shape))
        reference = np.asarray(built(images, training=False))
        assert relative_difference(outputs(model, images), reference) <= RELATIVE_TOLERANCE, shape
