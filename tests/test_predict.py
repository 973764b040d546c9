"""`predict-mobilenet`: top-k labels for classifiers, a label-map PNG for DeepLab, on the real images of
../shared/realdata with converted fixture models (random weights: the format is checked, not the labels)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from converter.app.predict import load_model, palette, predict_main
from converter.images import preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGES = SHARED / "realdata" / "images"
CLASSIFICATION_IMAGES = ("cat.bmp", "grace_hopper.bmp", "missvickie_potato_chips.bmp")
LINE = re.compile(r"^  +(\d\.\d{4})  (.+)$")


@pytest.fixture(scope="module")
def images() -> Path:
    if not IMAGES.is_dir():
        pytest.skip(f"{IMAGES} is absent: the real test images (../shared/realdata) are not available")
    return IMAGES


def test_classifier_prints_top5_per_image(classifier_folder: Path, images: Path):
    paths = [str(images / name) for name in CLASSIFICATION_IMAGES]
    result = CliRunner().invoke(predict_main, [*paths, "--model", str(classifier_folder)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 6 * len(paths)
    labels = set(load_model(classifier_folder).labels.values())
    for k, path in enumerate(paths):
        assert lines[6 * k] == path
        rows = [LINE.match(line) for line in lines[6 * k + 1 : 6 * k + 6]]
        assert all(rows), lines[6 * k : 6 * k + 6]
        probabilities = [float(row[1]) for row in rows]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-3
        assert all(row[2] in labels for row in rows)


def test_top_k_option(classifier_folder: Path, images: Path):
    result = CliRunner().invoke(
        predict_main, [str(images / "cat.bmp"), "--model", str(classifier_folder), "--top", "2"]
    )
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3


def test_preprocessing_matches_transformers_image_processor(classifier_folder: Path, images: Path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(classifier_folder)
    image = Image.open(images / "grace_hopper.bmp").convert("RGB")  # not square
    ours = preprocess(image, load_model(classifier_folder).preprocessing)[None]
    theirs = processor(images=image, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 96, 96)
    assert np.abs(ours - theirs).max() < 1e-5


def test_segmentation_writes_an_overlay_and_a_histogram(segmenter_folder: Path, images: Path, tmp_path):
    from PIL import Image

    image = images / "bird_segmentation.bmp"
    out = tmp_path / "seg"
    result = CliRunner().invoke(predict_main, [str(image), "--model", str(segmenter_folder), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    target = out / "bird_segmentation_segmentation.png"
    lines = result.stdout.splitlines()
    assert lines[0] == str(image) and lines[1] == f"  wrote {target}"
    with Image.open(target) as written, Image.open(image) as original:
        assert written.size == original.size and written.mode == "RGB"
    rows = [re.match(r"^ +(\d+\.\d\d)% +(\d+) px  (\S+)$", line) for line in lines[2:]]
    assert rows and all(rows), lines
    voc = set(load_model(segmenter_folder).labels.values())
    assert {row[3] for row in rows} <= voc
    assert sum(int(row[2]) for row in rows) == original.size[0] * original.size[1]


def test_palette_is_the_pascal_colour_map():
    colours = palette(21)
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0]
    assert colours[15].tolist() == [192, 128, 128]  # person
    assert len({tuple(c) for c in colours}) == 21


def test_errors_are_one_line(classifier_folder: Path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(predict_main, [str(tmp_path / "missing.jpg"), "--model", str(classifier_folder)])
    assert result.exit_code == 1 and result.stderr == f"error: {tmp_path / 'missing.jpg'} does not exist\n"

    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = runner.invoke(predict_main, [str(tmp_path / "broken.jpg"), "--model", str(classifier_folder)])
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot read the image")

    result = runner.invoke(predict_main, [str(tmp_path / "broken.jpg"), "--model", str(tmp_path)])
    assert result.exit_code == 1 and "pass a folder written by convert-mobilenet" in result.stderr
    assert len(result.stderr.splitlines()) == 1
