"""Heads: --backbone-only writes a backbone folder (MobileNetV2Model) that loads in transformers too, and
--add-background gives a 1000-class head the background class at index 0 that never wins."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.errors import UsageError
from fixtures.cache import ensure_fixture
from fixtures.spec import make_weights
from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2Model
from tests.helpers import SMALL, logit_tolerance, random_images


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def test_backbone_only_gives_the_classifiers_features_and_loads_in_transformers(classifier_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "backbone"
    summary = convert_checkpoint(ensure_fixture(SMALL).tarball, out, backbone_only=True)
    record = json.loads((out / "conversion.json").read_text())
    assert summary.variant.kind == "backbone" and record["tensors"]["ignored"]["head_set_aside"] == 4
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MobileNetV2Model"]
    x = nchw(random_images((97, 113), seed=1))
    with torch.inference_mode():
        ours = MobileNetV2Model.from_pretrained(out)(x).last_hidden_state
        full = MobileNetV2ForImageClassification.from_pretrained(classifier_folder).mobilenet_v2(x).last_hidden_state
        theirs = transformers.MobileNetV2Model.from_pretrained(out).eval()(x).last_hidden_state
    assert torch.equal(ours, full)
    assert torch.allclose(theirs, ours, atol=1e-5)


@pytest.fixture(scope="module")
def thousand_class_checkpoint(tmp_path_factory):
    """The fixture checkpoint with its head cut to the 1000 ImageNet classes (as Keras ships it), written by
    TensorFlow's own SaveV2."""
    pytest.importorskip("tensorflow")
    from fixtures.tf_builder import save_tensors

    weights = make_weights(SMALL)
    for name in list(weights):
        if name.startswith("MobilenetV2/Logits/Conv2d_1c_1x1/"):
            weights[name] = weights[name][..., 1:]
    return save_tensors(tmp_path_factory.mktemp("thousand") / "mobilenet_v2_0.35_96.ckpt", weights)


def test_add_background_prepends_a_class_that_never_wins(thousand_class_checkpoint, tmp_path):
    from fixtures.tf_builder import run_graph

    out = tmp_path / "with_background"
    convert_checkpoint(thousand_class_checkpoint, out, add_background=True)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["0"] == "background" and config["id2label"]["1"].startswith("tench")
    images = random_images((96, 96), batch=2, seed=2)
    expected = run_graph(SMALL, images, convention="ema")["Logits"]  # the original 1001-class graph
    with torch.inference_mode():
        ours = MobileNetV2ForImageClassification.from_pretrained(out)(nchw(images)).logits.numpy()
    assert ours.shape == (2, 1001)
    assert np.abs(ours[:, 1:] - expected[:, 1:]).max() <= logit_tolerance(expected)
    assert (ours[:, 0] < ours[:, 1:].min(axis=1)).all()
    assert json.loads((out / "conversion.json").read_text())["add_background"] is True


def test_a_thousand_class_head_gets_imagenet_labels_and_refuses_drop_background(thousand_class_checkpoint, tmp_path):
    convert_checkpoint(thousand_class_checkpoint, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert len(config["id2label"]) == 1000 and config["id2label"]["0"].startswith("tench")
    with pytest.raises(UsageError, match="1001-class"):
        convert_checkpoint(thousand_class_checkpoint, tmp_path / "dropped", drop_background=True)
    with pytest.raises(UsageError, match="contradict"):
        convert_checkpoint(thousand_class_checkpoint, tmp_path / "both", drop_background=True, add_background=True)


def test_a_renamed_checkpoint_gets_no_silent_image_size(tmp_path):
    """A prefix that is not a zoo name does not say its size: 224 is recorded as assumed, with a note in
    conversion.json and on the command line, and --size sets it."""
    import shutil
    import subprocess
    import sys

    files = ensure_fixture(SMALL).root / "files"
    for path in files.glob(f"{SMALL}.ckpt.*"):
        shutil.copy(path, tmp_path / path.name.replace(SMALL, "my_model"))
    command = [sys.executable, "-c", "from converter.app.cli import convert_main; convert_main()"]
    args = ["--checkpoint", str(tmp_path / "my_model.ckpt"), "--output", str(tmp_path / "out")]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "note: image_size 224 is assumed" in result.stderr and "--size" in result.stderr
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["variant"]["size_from"] == "assumed" and any("assumed" in note for note in record["notes"])
    summary = convert_checkpoint(tmp_path / "my_model.ckpt", tmp_path / "sized", size=96)
    assert summary.variant.size == 96 and summary.variant.size_from == "--size" and not summary.notes
