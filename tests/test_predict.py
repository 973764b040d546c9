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


def test_segmentation_writes_the_label_map_and_an_overlay(segmenter_folder: Path, images: Path, tmp_path):
    from PIL import Image

    image = images / "bird_segmentation.bmp"
    out = tmp_path / "seg"
    result = CliRunner().invoke(predict_main, [str(image), "--model", str(segmenter_folder), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    labels_png, overlay_png = out / "bird_segmentation_labels.png", out / "bird_segmentation_overlay.png"
    lines = result.stdout.splitlines()
    assert lines[:3] == [str(image), f"  wrote {labels_png}", f"  wrote {overlay_png}"]
    with Image.open(labels_png) as written, Image.open(image) as original:
        assert written.mode == "P" and written.size == original.size
        labels = np.asarray(written)
        colours = np.asarray(written.getpalette()[: 3 * 21], np.uint8).reshape(21, 3)
        picture = np.asarray(original.convert("RGB"))
    # VOC colours of background, aeroplane and person
    assert colours[[0, 1, 15]].tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128]]
    with Image.open(overlay_png) as written:
        assert written.mode == "RGB" and written.size == original.size
        blended = np.asarray(written)
    background = labels == 0
    assert (blended[background] == picture[background]).all()  # the overlay tints only the classes found
    voc = load_model(segmenter_folder).labels
    rows = [re.match(r"^ +(\d+\.\d\d)% +(\d+) px  (\S+)$", line) for line in lines[3:]]
    assert rows and all(rows), lines
    values, counts = np.unique(labels, return_counts=True)  # the label map holds the class ids it reports
    assert {row[3]: int(row[2]) for row in rows} == {voc[int(v)]: int(c) for v, c in zip(values, counts, strict=True)}


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


def _picture(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


def test_every_image_is_processed_and_failures_come_at_the_end(classifier_folder: Path, tmp_path):
    good, other = _picture(tmp_path / "good.png"), _picture(tmp_path / "other.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    args = [good, tmp_path / "missing.jpg", tmp_path / "broken.jpg", other]
    result = CliRunner().invoke(predict_main, [*map(str, args), "--model", str(classifier_folder)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert [lines[0], lines[6]] == [str(good), str(other)] and len(lines) == 12  # both good images, top 5 each
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'missing.jpg'} does not exist",
        f"error: cannot read the image {tmp_path / 'broken.jpg'} (cannot identify image file "
        f"'{tmp_path / 'broken.jpg'}')",
    ]
    assert result.output.splitlines()[-2:] == result.stderr.splitlines()  # after every result


def test_a_closed_pipe_ends_quietly(classifier_folder: Path, tmp_path):
    """`predict-mobilenet ... | head -n 1`: no traceback, no "internal error", the SIGPIPE status."""
    import subprocess
    import sys

    image = str(_picture(tmp_path / "image.png"))
    command = [sys.executable, "-c", "from converter.app.predict import predict_main; predict_main()"]
    process = subprocess.Popen(
        [*command, *[image] * 20, "--model", str(classifier_folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert process.stdout.readline() == f"{image}\n".encode()
    process.stdout.close()  # as `head -n 1` does after its line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and stderr == ""
