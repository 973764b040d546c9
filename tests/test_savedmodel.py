"""SavedModels (TF Hub / Kaggle) and TF1 Hub modules, written by TensorFlow's own SavedModel writers, convert
exactly: the converted model's logits equal the SavedModel's own serving signature at the float32 floor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")  # the SavedModels are written and run by TensorFlow

import torch  # noqa: E402

from converter import convert_checkpoint  # noqa: E402
from converter.errors import CheckpointFormatError, SourceError  # noqa: E402
from converter.formats import open_reader  # noqa: E402
from fixtures.savedmodel_builder import (  # noqa: E402
    HUB_MODULE_DEF,
    HUB_STYLES,
    kaggle_archive,
    run_saved_model,
    write_saved_model,
)
from mobilenet_torch import MobileNetV2ForImageClassification  # noqa: E402
from tests.helpers import REPO, SMALL, logit_tolerance, random_images  # noqa: E402

SIZES = [(96, 96), (97, 97), (80, 112)]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """style -> SavedModel folder of the 0.35_96 fixture weights (ema convention)."""
    root = tmp_path_factory.mktemp("saved_models")
    return {style: write_saved_model(SMALL, root / style, style) for style in ("tf1", "tf2")}


@pytest.fixture(scope="module")
def expected_logits(saved_models):
    """style -> the SavedModel's own logits on each of SIZES (seeded images)."""
    return {
        style: [run_saved_model(folder, random_images(shape, batch=2, seed=i)) for i, shape in enumerate(SIZES)]
        for style, folder in saved_models.items()
    }


def converted_logits(folder, images_nhwc):
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    with torch.inference_mode():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).logits.numpy()


@pytest.mark.parametrize("style", ["tf1", "tf2"])
@pytest.mark.parametrize("packed", [False, True], ids=["folder", "kaggle-archive"])
def test_saved_models_convert_to_their_own_logits(saved_models, expected_logits, style, packed, tmp_path):
    source = saved_models[style]
    if packed:
        source = kaggle_archive(source, tmp_path / f"{style}.tar.gz")
    out = tmp_path / "converted"
    summary = convert_checkpoint(source, out, size=96)
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"]["format"] == "saved-model"
    assert record["weights"] == "as exported" and summary.variant.depth == 0.35
    assert not any("hub_input" in note for note in record["notes"])  # takes [-1, 1] itself
    for index, (shape, expected) in enumerate(zip(SIZES, expected_logits[style], strict=True)):
        ours = converted_logits(out, random_images(shape, batch=2, seed=index))
        assert np.abs(ours - expected).max() <= logit_tolerance(expected), shape


def test_a_scope_in_front_of_the_slim_names_is_removed(tmp_path):
    folder = write_saved_model(SMALL, tmp_path / "scoped", "tf2", scope="module/")
    with open_reader(folder) as reader:
        assert "MobilenetV2/Conv/weights" in reader.names()
        assert not [name for name in reader.names() if name.startswith("module/")]
    images = random_images((96, 96), seed=5)
    convert_checkpoint(folder, tmp_path / "out")
    expected = run_saved_model(folder, images)
    assert np.abs(converted_logits(tmp_path / "out", images) - expected).max() <= logit_tolerance(expected)


def test_a_tf1_hub_module_is_recognised_and_converts(saved_models, expected_logits, tmp_path):
    module = tmp_path / "module"
    shutil.copytree(saved_models["tf1"], module)
    (module / "tfhub_module.pb").write_bytes(HUB_MODULE_DEF)
    convert_checkpoint(module, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["source"]["format"] == "tf-hub-module"
    (expected, *_) = expected_logits["tf1"]
    ours = converted_logits(tmp_path / "out", random_images(SIZES[0], batch=2, seed=0))
    assert np.abs(ours - expected).max() <= logit_tolerance(expected)


@pytest.mark.parametrize("style", HUB_STYLES)
def test_hub_form_exports_taking_zero_to_one_convert_exactly_to_a_model_taking_minus_one_to_one(style, tmp_path):
    """TF Hub's form: images in [0, 1], scaled to [-1, 1] inside the graph. The converted model takes [-1, 1]
    (what its preprocessor_config.json prepares) and gives the export's own logits for the same images."""
    source = write_saved_model(SMALL, tmp_path / style, style)
    if style == "hub-tf2":  # Kaggle serves the TF2 export as an archive
        source = kaggle_archive(source, tmp_path / "kaggle.tar.gz")
    out = tmp_path / "converted"
    convert_checkpoint(source, out, size=96)
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"]["format"] == ("tf-hub-module" if style == "hub-tf1" else "saved-model")
    assert any("scales its input in a hub_input scope" in note for note in record["notes"])
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == preprocessor["image_std"] == [0.5] * 3  # pixels / 255 -> [-1, 1]
    folder = tmp_path / style
    for index, shape in enumerate(SIZES):
        images = random_images(shape, batch=2, seed=index)
        expected = run_saved_model(folder, (images + 1) / 2, style)
        assert np.abs(converted_logits(out, images) - expected).max() <= logit_tolerance(expected), shape


def test_a_damaged_object_graph_is_a_clear_error(saved_models, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(saved_models["tf2"], folder)
    data = folder / "variables" / "variables.data-00000-of-00001"
    with open_reader(folder) as reader:
        offset = reader.bundle._entry("_CHECKPOINTABLE_OBJECT_GRAPH").offset
    raw = bytearray(data.read_bytes())
    raw[offset + 10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match="_CHECKPOINTABLE_OBJECT_GRAPH"):
        convert_checkpoint(folder, tmp_path / "out")


def test_a_saved_model_without_variables_is_a_clear_error(saved_models, tmp_path):
    folder = tmp_path / "frozen"
    folder.mkdir()
    shutil.copy(saved_models["tf2"] / "saved_model.pb", folder)
    with pytest.raises(SourceError, match="no variables"):
        convert_checkpoint(folder, tmp_path / "out")


def test_an_unknown_file_lists_the_known_formats(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(SourceError, match="known formats: tf-hub-module .*saved-model .*tf-checkpoint"):
        convert_checkpoint(path, tmp_path / "out")


def test_saved_model_conversion_imports_neither_tensorflow_nor_torch(saved_models, tmp_path):
    code = (
        "import json, sys\n"
        "from converter import convert_checkpoint\n"
        f"convert_checkpoint({str(saved_models['tf2'])!r}, {str(tmp_path / 'out')!r})\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not set(json.loads(result.stdout.splitlines()[-1])) & {"tensorflow", "torch", "keras"}
