"""SavedModels as their producers write them: Keras 3's `model.export()` and `tf.saved_model.save(model)`,
tf_keras' `model.save(folder, save_format="tf")`, and training code (TF1 with slim's training_scope losses,
TF2 with variables created from random initializers). Each converts with nothing but the file, the
converted model gives the producer's own outputs on real images, and verify-mobilenet passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import SHARED, SMALL

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("tf_keras")

from fixtures.savedmodel_builder import (  # noqa: E402 (TensorFlow is needed to build the fixtures)
    KERAS_PRODUCERS,
    KERAS_SHAPES,
    KerasShape,
    ensure_keras_saved_model,
    run_signature,
    write_keras_saved_model,
    write_training_saved_model,
)

IMAGES = SHARED / "realdata" / "images"
SHAPES = {shape.name: shape for shape in KERAS_SHAPES}


def real_images(size: int) -> np.ndarray:
    """The real photographs (not the segmentation masks), resized to `size`, as x / 127.5 - 1 (NHWC)."""
    if not IMAGES.is_dir():
        pytest.skip(f"{IMAGES} is absent: no real images to compare on")
    from PIL import Image

    paths = sorted(p for p in IMAGES.glob("*.bmp") if "mask" not in p.name)
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    return (np.stack(pixels).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def ours(folder: Path, images: np.ndarray, include_top: bool) -> np.ndarray:
    """The converted model on NHWC images: class probabilities (Keras' classifier ends in a softmax), or
    the backbone's last feature map (NHWC, as Keras' no-top model returns it)."""
    from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2Model

    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        if include_top:
            model = MobileNetV2ForImageClassification.from_pretrained(folder).eval()
            return torch.softmax(model(pixels).logits, dim=-1).numpy()
        model = MobileNetV2Model.from_pretrained(folder).eval()
        return model(pixels).last_hidden_state.numpy().transpose(0, 2, 3, 1)


def verify(source: Path, model: Path) -> tuple[int, str, dict]:
    from converter.app.cli import verify_main

    result = CliRunner().invoke(verify_main, ["--checkpoint", str(source), "--model", str(model)])
    report = model / "parity" / "parity.json"
    return result.exit_code, result.output, json.loads(report.read_text()) if report.is_file() else {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(producer, shape name) -> (the producer's SavedModel, the folder converted from it, no option given)."""
    from converter import convert_checkpoint

    root, folders = tmp_path_factory.mktemp("keras_saved_models"), {}

    def get(producer: str, shape: KerasShape) -> tuple[Path, Path]:
        if (producer, shape.name) not in folders:
            source = ensure_keras_saved_model(producer, shape)
            folder = root / f"{producer}_{shape.name}"
            convert_checkpoint(source, folder)
            folders[producer, shape.name] = source, folder
        return folders[producer, shape.name]

    return get


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("producer", KERAS_PRODUCERS)
def test_a_keras_saved_model_converts_to_the_producers_outputs_on_real_images(converted, producer, shape):
    shape = SHAPES[shape]
    source, folder = converted(producer, shape)
    images = real_images(shape.size)
    reference = run_signature(source, images)
    mine = ours(folder, images, shape.include_top)
    assert mine.shape == reference.shape
    assert np.abs(mine - reference).max() / np.abs(reference).max() <= 1e-4
    # The outputs depend on the image: a model that ignored its input would not prove anything.
    assert np.abs(reference - reference.mean(axis=0)).max() > 1e-2 * np.abs(reference).max()
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source"]["format"] == "saved-model" and record["weights"] == "raw"


@pytest.mark.parametrize("producer", KERAS_PRODUCERS)
def test_verify_runs_a_keras_saved_models_serving_signature_and_passes(converted, producer):
    shape = next(shape for shape in KERAS_SHAPES if shape.include_top)
    source, folder = converted(producer, shape)
    code, output, report = verify(source, folder)
    assert code == 0, output
    assert report["reference"]["kind"] == "saved_model"
    assert any("Softmax" in note and "Identity" in note for note in report["reference"]["notes"])


def compared_endpoints(report: dict) -> dict[str, dict]:
    return {entry["endpoint"]: entry for entry in report["endpoints"] if entry.get("compared")}


@pytest.mark.parametrize("producer", KERAS_PRODUCERS)
def test_verify_compares_a_no_top_saved_models_feature_map_and_passes(converted, producer):
    shape = next(shape for shape in KERAS_SHAPES if not shape.include_top)
    source, folder = converted(producer, shape)
    code, output, report = verify(source, folder)
    assert code == 0, output
    compared = compared_endpoints(report)
    assert set(compared) == {"layer_19"} and compared["layer_19"]["passed"]
    assert compared["layer_19"]["max_rel_diff"] <= 1e-4
    assert any("last feature map (layer_19)" in note for note in report["reference"]["notes"])


def test_verify_compares_a_pooled_no_top_saved_model_on_its_global_average(tmp_path):
    from converter import convert_checkpoint

    source = write_keras_saved_model("tf-keras", KerasShape(0.35, 97, False, "avg"), tmp_path / "pooled")
    folder = tmp_path / "converted"
    convert_checkpoint(source, folder)
    code, output, report = verify(source, folder)
    assert code == 0, output
    compared = compared_endpoints(report)
    assert set(compared) == {"global_pool"} and compared["global_pool"]["max_rel_diff"] <= 1e-4


def test_a_verify_that_compares_no_endpoint_is_a_fail_not_a_pass(converted, tmp_path):
    """A classifier's SavedModel against its backbone alone: the signature returns class probabilities, which
    are no endpoint of a backbone, so nothing is compared, and that is no PASS."""
    from converter import convert_checkpoint

    shape = next(shape for shape in KERAS_SHAPES if shape.include_top)
    source, _ = converted("keras3-export", shape)
    folder = tmp_path / "backbone"
    convert_checkpoint(source, folder, backbone_only=True)
    code, output, report = verify(source, folder)
    assert code == 1, output
    assert not compared_endpoints(report) and report["verdict"] == "FAIL"
    assert "Not a PASS: no endpoint was compared" in output


#: Each style at depth 0.35, compared at an even or an odd size (the folder's image_size).
TRAINING_CASES = [("training-tf1", 96), ("training-tf1", 97), ("training-tf2", 97), ("training-tf2-lazy", 96)]


@pytest.mark.parametrize(("style", "size"), TRAINING_CASES)
def test_verify_passes_on_a_saved_model_from_training_code_and_reports_what_it_left_out(style, size, tmp_path):
    """The variables' random initializers never run (the loader restores every variable), nor do the losses."""
    from converter import convert_checkpoint

    source = write_training_saved_model(SMALL, tmp_path / style, style)
    folder = tmp_path / "converted"
    convert_checkpoint(source, folder, size=size)
    code, output, report = verify(source, folder)
    assert code == 0, output
    assert report["inputs"][0]["shape"][2:] == [size, size]
    assert compared_endpoints(report)["logits"]["passed"]
    left_out = report["reference"]["left_out_ops"]
    assert {"RestoreV2", "SaveV2"} <= set(left_out)  # the saver: its restore run by the loader only
    assert "TruncatedNormal" not in report["reference"]["imported_ops"]
    if style == "training-tf1":  # the losses and initializers of slim's training_scope never run
        assert left_out["L2Loss"] > 0 and left_out["TruncatedNormal"] > 0
        assert "L2Loss" not in report["reference"]["imported_ops"]


def test_a_saved_model_holding_a_file_write_off_the_signatures_path_is_still_refused(tmp_path):
    """What never runs is left out, but a file write, even off the path, is refused: the loader would load it."""
    import tensorflow as tf

    from converter import convert_checkpoint

    source = write_training_saved_model(SMALL, tmp_path / "training", "training-tf1")
    folder = tmp_path / "converted"
    convert_checkpoint(source, folder)
    v1 = tf.compat.v1
    hostile = tmp_path / "hostile"
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session:
        images = v1.placeholder(tf.float32, [None, None, None, 3], name="images")
        weights = v1.get_variable("MobilenetV2/Conv/weights", [3, 3, 3, 16], initializer=v1.zeros_initializer())
        logits = tf.reduce_mean(tf.nn.conv2d(images, weights, 2, "SAME"), axis=[1, 2])
        tf.io.write_file(str(tmp_path / "written.txt"), "not by the verifier")
        session.run(v1.global_variables_initializer())
        signature = v1.saved_model.predict_signature_def(inputs={"images": images}, outputs={"logits": logits})
        builder = v1.saved_model.Builder(str(hostile))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature})
        builder.save()
    code, output, _ = verify(hostile, folder)
    assert code == 2, output
    assert "WriteFile" in output and "reads or writes files" in output
    assert not (tmp_path / "written.txt").exists()
